"""Attacks on the runaway guard's promises (issue 18): replays, two sidecars racing,
boundary values, thousands of entries ending together and faults. Every count is asserted
exactly on the raw Redis fields; nothing waits on a clock it does not drive."""

from __future__ import annotations

from typing import Any

import redis

from sidecar import keys
from tests.conftest import ClientFactory

TENANT = keys.tenant_keys("default")


def guard_doc(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"budgets": [], "settings": {"redis_timeout_ms": 60_000}}
    doc.update(sections)
    return doc


async def post(client: Any, path: str, body: Any) -> tuple[int, Any]:
    r = await client.post(path, json=body)
    return r.status, await r.json(content_type=None)


# ---- the stop switch where nothing applies per run ----------------------------------------


async def test_a_run_stop_binds_its_own_run_when_no_guard_is_per_run(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A call's resolution is memoized without its run id when nothing in the config is per
    run; the run's stop field must still be this call's run, not the run of the call that
    filled the memo: a stop of r2 denies r2, and a stop of r1 denies neither r2 nor a call
    that names no run."""
    budget = {"id": "agent-day", "name": "Agent day", "scope": "agent", "period": "daily",
              "limit_usd": 100}  # fmt: skip
    client = await make_client(guard_doc(budgets=[budget]))
    call = {"agent_id": "a1", "estimated_usd": 0.01}
    _, first = await post(client, "/v1/authorize", {**call, "run_id": "r1"})
    assert first["allowed"] is True, first
    status, made = await post(
        client, "/v1/stops", {"scope": "run", "scope_id": "r2", "reason": "runaway r2"}
    )
    assert status == 201, made
    for path in ("/v1/authorize", "/v1/check"):
        _, d = await post(client, path, {**call, "run_id": "r2"})
        assert (d["allowed"], d["reason"]) == (False, "stop"), (path, d)
        assert d["stop"]["stop_id"] == made["id"]
    status, made = await post(
        client, "/v1/stops", {"scope": "run", "scope_id": "r1", "reason": "runaway r1"}
    )
    assert status == 201, made
    for body in ({**call, "run_id": "r3"}, call):
        _, d = await post(client, "/v1/authorize", body)
        assert d["allowed"] is True, (body, d)
    _, d = await post(client, "/v1/authorize", {**call, "run_id": "r1"})
    assert (d["allowed"], d["reason"]) == (False, "stop"), d
    # Only the calls that passed hold anything: 3 x $0.01 on the agent's day.
    held = [int(v) for k, v in redis_client.hgetall(TENANT.counters).items() if k.startswith("h:")]
    assert held == [30_000], held
