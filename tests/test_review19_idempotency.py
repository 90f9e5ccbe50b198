"""Review 19: an idempotency key's mapping ("k:<key>" in bs:{T}:res) goes with the
reservation it names, and only with that one. A cancel (an authorize that timed out,
sidecar.engine._cancel) frees the key, a retry makes a second reservation under it; when
the cancelled one's retention ended, the collection of its record deleted the key's
mapping although it named the retry's reservation by then: the key forgot its decision
while that was still kept, and the same request repeated got a new hold (invariant 9: a
replay must not grant spend)."""

from __future__ import annotations

from typing import Any

import redis

from sidecar import keys
from sidecar.api.app import ENGINE, SWEEPER
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory

T = keys.tenant_keys("default")
DOC = {"budgets": [{"id": "user", "name": "Each user", "scope": "user", "limit_usd": 10,
                    "period": "daily"}]}  # fmt: skip
BODY = {"user_id": "u1", "estimated_usd": 0.3, "idempotency_key": "run-1:step-1"}
KEEP_MS = 3_600_000  # settings.keep_finished_ms by default


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await client.post(path, json=body)
    data: dict[str, Any] = await r.json()
    return r.status, data


async def test_a_cancelled_reservations_collection_keeps_its_retrys_key(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC)
    engine = client.server.app[ENGINE]
    status, first = await post(client, "/v1/authorize", BODY)
    assert status == 200 and first["allowed"], first
    # The background cancel of a timed-out authorize, as engine._cancel sends it.
    args = [clock.now_ms(), first["reservation_id"], KEEP_MS, "1", clock.limiter_ms()]
    await engine.run_script(engine.scripts.release, "default", args)
    assert not redis_client.hexists(T.reservations, "k:run-1:step-1")

    # Half a retention later the client's retry makes a reservation of its own and settles.
    clock.advance(KEEP_MS // 2)
    status, retry = await post(client, "/v1/authorize", BODY)
    assert status == 200 and retry["allowed"] and not retry["replayed"], retry
    rid = retry["reservation_id"]
    status, settled = await post(client, "/v1/settle", {"reservation_id": rid,
                                                         "cost_usd": 0.25})  # fmt: skip
    assert status == 200 and settled["state"] == "settled", settled

    # The cancelled reservation's retention ends (the retry's has half of it to go): its
    # record goes, the key stays with the retry's reservation.
    clock.advance(KEEP_MS // 2 + 1)
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert not redis_client.hexists(T.reservations, first["reservation_id"])
    assert redis_client.hget(T.reservations, "k:run-1:step-1") == rid
    # The same request again: its reservation is settled, nothing more is held.
    status, again = await post(client, "/v1/authorize", BODY)
    assert status == 409, again
    cid = "user/u1/d20260310"
    assert redis_client.hmget(T.counters, "u:" + cid, "h:" + cid) == ["250000", None]

    # The retry's own retention ends: its record and the key go together.
    clock.advance(KEEP_MS // 2)
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert not redis_client.exists(T.reservations, T.gc)
