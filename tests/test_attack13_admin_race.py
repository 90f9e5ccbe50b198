"""A budget lowered (PUT) while 30 authorizes of its entity are in flight, on a real
redis-server: the PUT's answer is the line. Every authorize sent after it is decided on
the new limit (each shows it, and none that holds takes used + held past it), those in
flight meanwhile on one limit or the other, and what is held at the end is exactly what
the allowed decisions held: nothing lost, nothing extra. A stop made, or lifted, amid 30
authorizes of its entity likewise holds for every authorize sent after its answer."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from tests.conftest import ClientFactory

CALLERS = 30
ROUNDS = 4
EST_MICRO = 100_000  # $0.10 held per allowed authorize, never settled
# 60 calls would hold $6: under the old limit every one passes, under the new exactly 45.
OLD_USD, NEW_USD = 10.0, 4.5
DOC: dict[str, Any] = {"budgets": []}


async def test_calls_sent_after_a_lowering_put_answers_are_held_to_the_new_limit(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)

    async def authorize(agent: str) -> dict[str, Any]:
        body = {"agent_id": agent, "estimated_usd": EST_MICRO / 1e6}
        resp = await client.post("/v1/authorize", json=body)
        assert resp.status == 200, await resp.text()
        decision: dict[str, Any] = await resp.json()
        return decision

    def state_of(decision: dict[str, Any], budget_id: str) -> dict[str, Any]:
        return next(s for s in decision["budgets"] if s["budget_id"] == budget_id)

    for r in range(ROUNDS):
        budget_id, agent = f"cap-{r}", f"agent-{r}"
        made = await client.post(
            "/api/v1/budgets",
            json={"id": budget_id, "name": "Cap", "scope": "agent", "scope_id": agent,
                  "limit_usd": OLD_USD, "period": "monthly"},
        )  # fmt: skip
        assert made.status == 201, await made.text()
        # The PUT sent after 0, 10, 20, 30 of the first 30 (its write lands among them).
        split = r * CALLERS // (ROUNDS - 1)
        before = [asyncio.ensure_future(authorize(agent)) for _ in range(split)]
        put = asyncio.ensure_future(
            client.put(f"/api/v1/budgets/{budget_id}", json={"limit_usd": NEW_USD})
        )
        before += [asyncio.ensure_future(authorize(agent)) for _ in range(CALLERS - split)]
        answered = await put
        assert answered.status == 200 and (await answered.json())["limit_usd"] == NEW_USD
        # Sent once the PUT has answered, while the first 30 may still be in flight.
        after = await asyncio.gather(*(authorize(agent) for _ in range(CALLERS)))
        during = await asyncio.gather(*before)

        for d in after:
            state = state_of(d, budget_id)
            assert state["limit_usd"] == NEW_USD, (r, state)
            if d["allowed"]:
                committed = round(state["used_usd"] * 1e6) + round(state["held_usd"] * 1e6)
                assert committed <= NEW_USD * 1e6, (r, state)
        for d in during:
            state = state_of(d, budget_id)
            assert state["limit_usd"] in (OLD_USD, NEW_USD), (r, state)
            if d["allowed"]:
                committed = round(state["used_usd"] * 1e6) + round(state["held_usd"] * 1e6)
                assert committed <= state["limit_usd"] * 1e6, (r, state)
        allowed = sum(d["allowed"] for d in (*during, *after))
        # The old limit admits at most the first 30 ($3, under both): the new one is filled
        # exactly, not passed (the calls sent after the PUT would all pass on the old one).
        assert allowed == round(NEW_USD * 1e6) // EST_MICRO, (r, allowed)
        status = await (
            await client.get(f"/v1/budgets/{budget_id}/status", params={"scope_id": agent})
        ).json()
        assert round(status["held_usd"] * 1e6) == allowed * EST_MICRO, (r, status, allowed)
        assert status["used_usd"] == 0
        # The new limit holds from now on: what is left of it is exactly what passes.
        room = max(0, round(NEW_USD * 1e6) - allowed * EST_MICRO) // EST_MICRO
        late = await asyncio.gather(*(authorize(agent) for _ in range(CALLERS)))
        assert sum(d["allowed"] for d in late) == min(room, CALLERS), (r, allowed)


async def test_a_stop_made_or_lifted_amid_30_authorizes_holds_from_its_answer(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({"budgets": [{"id": "org", "name": "Org", "scope": "organization",
                                             "limit_usd": 1000, "period": "monthly"}]})  # fmt: skip

    async def authorize(agent: str) -> bool:
        body = {"agent_id": agent, "estimated_usd": 0.01}
        resp = await client.post("/v1/authorize", json=body)
        assert resp.status == 200, await resp.text()
        allowed: bool = (await resp.json())["allowed"]
        return allowed

    for r in range(3):
        agent = f"agent-{r}"
        during = [asyncio.ensure_future(authorize(agent)) for _ in range(CALLERS)]
        made = await client.post("/v1/stops", json={"scope": "agent", "scope_id": agent,
                                                    "reason": "runaway"})  # fmt: skip
        assert made.status == 201
        after = await asyncio.gather(*(authorize(agent) for _ in range(CALLERS)))
        assert sum(after) == 0, (r, after)  # every one sent after the answer is stopped
        other = await asyncio.gather(*(authorize(f"other-{r}") for _ in range(CALLERS)))
        assert all(other)  # another entity is not
        await asyncio.gather(*during)
        lifting = [asyncio.ensure_future(authorize(agent)) for _ in range(CALLERS)]
        lifted = await client.delete(f"/v1/stops/{(await made.json())['id']}")
        assert lifted.status == 204
        after = await asyncio.gather(*(authorize(agent) for _ in range(CALLERS)))
        assert all(after), (r, after)  # every one sent after the lift passes
        await asyncio.gather(*lifting)
