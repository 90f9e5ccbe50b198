"""Review 19: a tenant that leaves the config is still collected. The sweep went over
engine.tenants() only, the tenants of the configured clients: once a tenant's clients were
removed (or open mode's "default" tenant was given credentials instead), nothing swept it
again, and its counters, finished reservations, leases and gc index, which have no TTL,
stayed in Redis for ever (invariant 11). The sweep now finds such tenants by a read-only
SCAN step per round."""

from __future__ import annotations

from typing import Any

import redis

from sidecar import keys
from sidecar.api.app import SWEEPER
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.test_auth import AGENT_A
from tests.test_auth import DOC as AUTH_DOC

DAY_MS = 86_400_000
OPEN = keys.tenant_keys("default")
DOC = {"budgets": [{"id": "user", "name": "Each user", "scope": "user", "limit_usd": 10,
                    "period": "daily"}]}  # fmt: skip


async def post(client: Any, path: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = await client.post(path, json=body, **kw)
    assert r.status == 200, await r.text()
    data: dict[str, Any] = await r.json()
    return data


async def test_a_tenant_that_left_the_config_is_collected_and_then_forgotten(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    # Open mode: tenant "default" spends, settles, leaves a hold to end unsettled.
    first = await make_client(DOC)
    for i in range(10):
        d = await post(first, "/v1/authorize", {"user_id": f"u{i}", "estimated_usd": 0.1,
                                                "idempotency_key": f"k{i}"})  # fmt: skip
        if i % 2 == 0:
            await post(first, "/v1/settle", {"reservation_id": d["reservation_id"],
                                             "cost_usd": 0.05})  # fmt: skip
    await first.close()

    # The deployment now has credentials: its clients' tenants are team-a, team-b, lab.
    second = await make_client(AUTH_DOC)
    await post(second, "/v1/authorize", {"estimated_usd": 0.01}, headers=AGENT_A)
    sweeper = second.server.app[SWEEPER]
    clock.advance(2 * DAY_MS)
    for _ in range(3):
        await sweeper.sweep_round()
    # Its counters went; the holds whose leases ended unsettled were returned by that
    # sweep, and their records are kept an hour from then, as any tenant's.
    assert not redis_client.exists(OPEN.counters, OPEN.leases)
    assert redis_client.zcard(OPEN.gc) == 5
    assert sweeper.orphans == {"default"}
    clock.advance(3_600_000 + 1)
    for _ in range(3):
        await sweeper.sweep_round()
    # Every key "default" wrote without a TTL is gone, and the sweep has forgotten it.
    assert redis_client.exists(OPEN.counters, OPEN.leases, OPEN.reservations, OPEN.gc,
                               OPEN.sweep) == 0  # fmt: skip
    assert sweeper.orphans == set()
    # The configured tenant's own call of two days ago is collected as always.
    team_a = keys.tenant_keys("team-a")
    assert redis_client.exists(team_a.counters, team_a.leases, team_a.reservations) == 0
