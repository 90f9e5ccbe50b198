"""Attack 16: hostile text in an alert (a budget name with quotes, a newline, unicode,
and a lone surrogate a YAML "\\ud800" escape lets into a config file's name): the JSON
delivered is valid and exact, and an alert that cannot be encoded as it stands does not
hold up the alerts behind it.

In-process WebhookDeliverer over the session's real redis-server, a receiver on
127.0.0.1 started here.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from sidecar import keys
from sidecar.model import Webhook
from sidecar.webhooks import signature
from tests.test_attack16_webhook_isolation import (
    SECRET,
    Receiver,
    aclient,
    deliverer,
    entry,
    eventually,
)

__all__ = ["aclient"]  # the fixture, used by name

HOSTILE = 'Team "ops"\n\\ ☃ 预算 \U0001f4b8 </script>'


def names(tenant: str, by_budget: dict[str, str]) -> Any:
    return lambda _t, budget_id: by_budget.get(budget_id)


async def test_hostile_names_arrive_as_exact_valid_json_and_a_lone_surrogate_holds_up_nothing(
    aclient: Any, redis_client: redis.Redis
) -> None:
    # A config file's name with a lone surrogate (YAML's "\ud800") is refused at load
    # (tests/test_config.py); should one reach the deliverer all the same, it is sent.
    surrogate_name = "Cap \ud800 end"
    tenant = "payloads"
    stream = keys.tenant_keys(tenant).alerts
    bad = {**entry("t1", 50), "cid": keys.counter_id("bad", "t1", "m202603")}
    redis_client.xadd(stream, bad)  # type: ignore[arg-type]
    redis_client.xadd(stream, entry("t1", 80))  # type: ignore[arg-type]
    # A stop whose reason carries quotes and unicode (stop reasons forbid control chars).
    stop: dict[Any, Any] = {
        "k": "stop",
        "g": "st1",
        "s": "team",
        "e": "t1",
        "r": 'halt "now" ☃',
        "x": "0",
    }
    redis_client.xadd(stream, {**stop, "at": "1773144000000"})
    receiver = await Receiver().start()
    d = deliverer(aclient, (Webhook("ops", receiver.url(), SECRET),), tenant)
    d._name_of = names(tenant, {"bad": surrogate_name, "team-cap": HOSTILE})
    run = d.lifecycle()
    await anext(run)
    try:
        await eventually(lambda: len(receiver.ok_ids()) == 3, "all three alerts")
    finally:
        await anext(run, None)
        await receiver.stop()
    bodies = [body for _i, body, _m in receiver.bodies]
    assert len(bodies) == 3
    decoded = [json.loads(body.decode("utf-8")) for body in bodies]  # strict UTF-8, valid JSON
    by_type = {(a["budget_id"], a["threshold"]): a for a in decoded}
    assert by_type[("team-cap", 80)]["message"] == f"Budget '{HOSTILE}' 80% reached (t1)"
    # The lone surrogate (no UTF-8 can carry it) is replaced; the rest is as configured.
    assert by_type[("bad", 50)]["message"] == "Budget 'Cap \ufffd end' 50% reached (t1)"
    assert by_type[("st1", 0)]["reason"] == 'halt "now" ☃'
    assert by_type[("st1", 0)]["message"] == "Stop 'st1' on team t1: halt \"now\" ☃"
    for (alert_id, body, _m), alert in zip(receiver.bodies, decoded, strict=True):
        assert alert["id"] == alert_id
        assert signature(SECRET, body).startswith("sha256=")


async def test_an_entry_that_fails_to_prepare_does_not_hold_up_the_ones_read_with_it(
    aclient: Any, redis_client: redis.Redis
) -> None:
    """Any bug met while preparing one alert (here: the name lookup raising) used to
    abort the whole batch: the entries read with it sat pending until a takeover, which
    met the same entry first and aborted again. Now it alone is left pending (logged)."""
    tenant = "payloads-bug"
    stream = keys.tenant_keys(tenant).alerts
    boom: dict[Any, Any] = {**entry("t1", 50), "cid": keys.counter_id("boom", "t1", "m202603")}
    redis_client.xadd(stream, boom)
    for t in (50, 80, 100):
        redis_client.xadd(stream, entry("t1", t))  # type: ignore[arg-type]

    def name_of(_tenant: str, budget_id: str) -> str:
        if budget_id == "boom":
            raise RuntimeError("a bug")
        return "Team cap"

    receiver = await Receiver().start()
    d = deliverer(aclient, (Webhook("ops", receiver.url(), SECRET),), tenant)
    d._name_of = name_of
    run = d.lifecycle()
    await anext(run)
    try:
        await eventually(lambda: len(receiver.ok_ids()) == 3, "the three good alerts")
        await eventually(
            lambda: redis_client.xpending(stream, "webhook:ops")["pending"] == 1,
            "the bad one alone left pending",
        )
    finally:
        await anext(run, None)
        await receiver.stop()
    assert sorted(json.loads(b)["threshold"] for _i, b, _m in receiver.bodies) == [50, 80, 100]
