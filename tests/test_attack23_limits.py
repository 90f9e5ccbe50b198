"""Attack 23: the rate limiters' corrections (settle, release) on a real redis-server,
with in-process replicas over FakeClocks (the limiters' clock too).

A token or usd limit changed (limit, window), deleted or reloaded while holds made under
the old definition are out: the settle or release of those holds must not move the
limiter of the new definition, at any scale; a changed limit starts over and admits
exactly what its own definition allows. A hold whose lease ended: released or settled
after reclaim (or a charge at the lease's end), its tokens go back to the limiter once,
never twice; concurrency slots are freed once; actual tokens 0, far above the estimate;
a limiter removed entirely while holds are out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.clock import FakeClock
from tests.conftest import T0_MS
from tests.harness import RedisServer
from tests.inprocess import app_over, call

CTR = keys.tenant_keys("default").counters
PRICING = [{"provider": "p", "model": "m", "input_per_1k": 1, "output_per_1k": 1}]


def rate(id: str, metric: str, limit: int | float, window: str | None = None,
         **kw: Any) -> dict[str, Any]:  # fmt: skip
    doc: dict[str, Any] = {"id": id, "scope": "organization", "metric": metric, "limit": limit}
    if window is not None:
        doc["window"] = window
    return {**doc, **kw}


def toks(n: int, **kw: Any) -> dict[str, Any]:
    return {"provider": "p", "model": "m", "estimated_tokens_in": n, "estimated_tokens_out": 0,
            **kw}  # fmt: skip


Replicas = Callable[..., Any]


@pytest.fixture
async def replicas(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Replicas]:
    """replicas(doc, n) -> n apps over the session's Redis, each on its own FakeClock at
    T0_MS (move them together with `advance`)."""
    made: list[Any] = []

    async def make(doc: dict[str, Any], n: int = 1) -> list[Any]:
        out = []
        for _ in range(n):
            clock = FakeClock(T0_MS)
            settings = {"redis_timeout_ms": 5000}
            client = await app_over(redis_server.url, {**doc, "settings": settings}, clock=clock)
            client.clock = clock  # type: ignore[attr-defined]
            made.append(client)
            out.append(client)
        return out

    yield make
    for c in made:
        await c.close()


def advance(apps: list[Any], ms: int) -> None:
    for a in apps:
        a.clock.advance(ms)


async def authorize(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    status, out = await call(client, "POST", "/v1/authorize", body)
    assert status == 200, out
    return out


async def settle(client: Any, rid: str, tokens: int) -> dict[str, Any]:
    body = {"reservation_id": rid, "tokens_in": tokens, "tokens_out": 0}
    status, out = await call(client, "POST", "/v1/settle", body)
    assert status == 200, out
    return out


async def release(client: Any, rid: str) -> dict[str, Any]:
    status, out = await call(client, "POST", "/v1/release", {"reservation_id": rid})
    assert status == 200, out
    return out


async def put_limit(client: Any, doc: dict[str, Any]) -> None:
    status, out = await call(client, "PUT", f"/v1/rate-limits/{doc['id']}", doc)
    assert status == 200, out


async def admitted(apps: list[Any], body: dict[str, Any], steps: int, step_ms: int,
                   per_step: int = 2) -> int:  # fmt: skip
    """Offer `per_step` calls of `body` every `step_ms` for `steps` steps (each admitted
    call settled at its estimate, so it keeps exactly what it was charged); the number
    admitted."""
    n = 0
    for _ in range(steps):
        for _ in range(per_step):
            d = await authorize(apps[0], body)
            if d["allowed"]:
                n += 1
                await settle(apps[0], d["reservation_id"], body["estimated_tokens_in"])
        advance(apps, step_ms)
    return n


# ---- 1. a definition changed while holds made under the old one are out ----------------


async def test_window_shortened_while_a_hold_is_out_does_not_lock_the_new_limit_out(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """1000 tokens / 10 s becomes 100 / 1 s (the same rate). A hold of 10 tokens made
    before the change settles after it with 1000: that call belongs to the old limiter.
    The new one admits exactly its own definition: 100 tokens a second, ten 10-token
    calls a second, from the change on."""
    (a,) = await replicas({"pricing": PRICING})
    status, _ = await call(a, "POST", "/v1/rate-limits", rate("tpm", "tokens", 1000, "10s"))
    assert status == 201
    old = await authorize(a, toks(10))
    assert old["allowed"]
    await put_limit(a, rate("tpm", "tokens", 100, "1s"))
    await settle(a, old["reservation_id"], 1000)
    # 10 s of 10-token calls offered twice every 100 ms: one passes each time.
    assert await admitted([a], toks(10), steps=100, step_ms=100) == 100


async def test_window_lengthened_a_late_settle_does_not_count_at_the_old_scale(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """100 tokens / 1 s becomes 1000 / 10 s. The settle of a hold made before the change
    adds its extra tokens to the old limiter, in the old limiter's units; the new one
    admits exactly 1000 tokens in its first 10 s (ten 100-token calls, one a second)."""
    (a,) = await replicas({"pricing": PRICING})
    status, _ = await call(a, "POST", "/v1/rate-limits", rate("tpm", "tokens", 100, "1s"))
    assert status == 201
    old = await authorize(a, toks(10))
    await put_limit(a, rate("tpm", "tokens", 1000, "10s"))
    await settle(a, old["reservation_id"], 100)
    assert await admitted([a], toks(100), steps=10, step_ms=1000) == 10


def field(rc: redis.Redis, name: str) -> int | None:
    value = rc.hget(CTR, name)
    return None if value is None else int(value)


async def test_lowered_limit_an_old_hold_settles_at_the_old_rate_into_the_old_limiter(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """1000 tokens / 1 s lowered to 100 / 1 s with 900 tokens held. The settle 500 ms on
    (1000 tokens) pays the old debt back at the old rate, in the old fields, exactly; the
    lowered limit admits exactly 100 tokens a second from the change on."""
    (a,) = await replicas({"pricing": PRICING})
    assert (await call(a, "POST", "/v1/rate-limits", rate("tpm", "tokens", 1000, "1s")))[0] == 201
    old = await authorize(a, toks(900))
    await put_limit(a, rate("tpm", "tokens", 100, "1s"))
    advance([a], 500)
    await settle(a, old["reservation_id"], 1000)
    assert await admitted([a], toks(10), steps=20, step_ms=100) == 20
    # 900 x 1000 paid back 1000 a ms for 500 ms, plus the 100 tokens more.
    assert field(redis_client, "d:tpm/default/1000/1000") == 400_000 + 100_000
    assert field(redis_client, "l:tpm/default/1000/1000") == T0_MS + 500
    # Twenty 10-token calls, each settled at its estimate: the debt as the last one's
    # authorize wrote it (the one before it paid back), nothing of the old hold.
    assert field(redis_client, "d:tpm/default/100/1000") == 10 * 1000


async def test_a_reload_that_changes_a_limit_replicas_on_either_definition(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """A config reload: replica a still runs 1000 tokens / 10 s, replica b already 100 /
    1 s. a's hold settles through b with 1000 tokens, and b's limiter admits exactly its
    own 100 tokens a second; a's limiter carries a's call alone."""
    (a,) = await replicas({"pricing": PRICING, "rate_limits": [rate("tpm", "tokens", 1000, "10s")]})
    (b,) = await replicas({"pricing": PRICING, "rate_limits": [rate("tpm", "tokens", 100, "1s")]})
    old = await authorize(a, toks(10))
    assert old["allowed"]
    await settle(b, old["reservation_id"], 1000)
    assert await admitted([b, a], toks(10), steps=50, step_ms=100) == 50
    assert field(redis_client, "d:tpm/default/1000/10000") == 1000 * 10_000
    # a, on the old definition, is locked out by its own call: 1000 tokens of 1000 per
    # 10 s, 5 s of it paid back.
    d = await authorize(a, toks(10))
    assert not d["allowed"] and d["retry_after_ms"] == 5000


async def test_usd_limit_window_changed_while_a_hold_is_out(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """Spend velocity $0.10 / 10 s becomes $0.01 / 1 s with $0.05 held; the hold settles
    at $0.10 after the change. The new limiter admits exactly one $0.01 call a second."""
    (a,) = await replicas({})
    assert (await call(a, "POST", "/v1/rate-limits", rate("burn", "usd", 0.1, "10s")))[0] == 201
    old = await authorize(a, {"estimated_usd": 0.05})
    assert old["allowed"]
    await put_limit(a, rate("burn", "usd", 0.01, "1s"))
    status, _ = await call(a, "POST", "/v1/settle",
                           {"reservation_id": old["reservation_id"], "cost_usd": 0.1})  # fmt: skip
    assert status == 200
    n = 0
    for _ in range(5):
        for _ in range(2):
            d = await authorize(a, {"estimated_usd": 0.01})
            if d["allowed"]:
                n += 1
                await call(a, "POST", "/v1/settle",
                           {"reservation_id": d["reservation_id"], "cost_usd": 0.01})  # fmt: skip
            else:
                assert d["reason"] == "velocity"
        advance([a], 1000)
    assert n == 5
    # 100 units of $0.001 x 10,000 ms in the old limiter.
    assert field(redis_client, "d:burn/default/100/10000") == 100 * 10_000


async def test_burst_changed_keeps_the_limiter_and_its_holds(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """Only limit and window give the debt its meaning: a burst (or mode) changed keeps the
    limiter, and a hold made before the change is given back to it."""
    (a,) = await replicas({"pricing": PRICING})
    assert (await call(a, "POST", "/v1/rate-limits", rate("tpm", "tokens", 100, "1s")))[0] == 201
    old = await authorize(a, toks(100))
    assert not (await authorize(a, toks(100)))["allowed"]
    await put_limit(a, rate("tpm", "tokens", 100, "1s", burst=100))
    assert (await authorize(a, toks(100)))["allowed"]  # debt 100 x 1000 within the burst
    assert not (await authorize(a, toks(100)))["allowed"]
    await release(a, old["reservation_id"])
    assert (await authorize(a, toks(100)))["allowed"]
    assert not (await authorize(a, toks(1)))["allowed"]
    assert field(redis_client, "d:tpm/default/100/1000") == 200 * 1000


async def test_limit_deleted_while_a_hold_is_out_then_made_again(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """Deleted with a hold out: its settle corrects the deleted limiter's fields (collected
    once paid back, as any), and the same definition made again goes on from them; made
    again with another limit it starts over."""
    (a,) = await replicas({"pricing": PRICING})
    tpm = rate("tpm", "tokens", 100, "1s")
    assert (await call(a, "POST", "/v1/rate-limits", tpm))[0] == 201
    old = await authorize(a, toks(100))
    assert (await call(a, "DELETE", "/v1/rate-limits/tpm"))[0] == 204
    await settle(a, old["reservation_id"], 50)
    assert (await call(a, "POST", "/v1/rate-limits", tpm))[0] == 201
    d = await authorize(a, toks(100))
    assert not d["allowed"] and d["retry_after_ms"] == 500
    advance([a], 500)
    assert (await authorize(a, toks(100)))["allowed"]
    assert (await call(a, "DELETE", "/v1/rate-limits/tpm"))[0] == 204
    assert (await call(a, "POST", "/v1/rate-limits", {**tpm, "limit": 200}))[0] == 201
    assert (await authorize(a, toks(200)))["allowed"]
    assert not (await authorize(a, toks(1)))["allowed"]


async def test_concurrency_lowered_with_holds_out_keeps_its_count(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """A concurrency limit counts calls in flight, whatever its definition: lowered from 3
    to 1 with 3 out, nothing passes until fewer than 1 are; each end frees one slot once,
    a release after its lease was reclaimed none."""
    (a,) = await replicas({})
    conc = rate("conc", "concurrent", 3)
    assert (await call(a, "POST", "/v1/rate-limits", conc))[0] == 201
    held = [await authorize(a, {"estimated_usd": 0.01, "lease_ms": lease})
            for lease in (60_000, 60_000, 1_000)]  # fmt: skip
    assert all(d["allowed"] for d in held)
    await put_limit(a, {**conc, "limit": 1})
    assert not (await authorize(a, {"estimated_usd": 0.01}))["allowed"]
    await release(a, held[0]["reservation_id"])
    assert field(redis_client, "n:conc/default") == 2
    advance([a], 1_000)  # held[2]'s lease ends: the next call reclaims it
    assert not (await authorize(a, {"estimated_usd": 0.01}))["allowed"]
    assert field(redis_client, "n:conc/default") == 1
    await release(a, held[2]["reservation_id"])  # after its reclaim: frees nothing
    await release(a, held[0]["reservation_id"])  # a replay: nothing
    assert field(redis_client, "n:conc/default") == 1
    assert not (await authorize(a, {"estimated_usd": 0.01}))["allowed"]
    await settle(a, held[1]["reservation_id"], 0)
    assert field(redis_client, "n:conc/default") is None
    again = [await authorize(a, {"estimated_usd": 0.01}) for _ in range(3)]
    assert [d["allowed"] for d in again] == [True, False, False]


# ---- 2. a hold whose lease ended: its tokens go back once ------------------------------

TPM_200 = {"pricing": PRICING, "rate_limits": [rate("tpm", "tokens", 200, "10s", burst=100)]}
DEBT = "d:tpm/default/200/10000"


async def _ended(
    a: Any, rc: redis.Redis, ending: str, on_expiry: str = "release"
) -> tuple[int, int]:
    """Hold A (100 tokens, lease 1 s, `on_expiry`) and B (100, a minute) at T0 on 200
    tokens / 10 s; at T0 + 2 s A ends by `ending`: 'release' in time (its lease made long
    enough), 'late-release' or 'late-settle' (100 tokens, its estimate) after a call
    reclaimed its lease, or 'none'. Then 100-token calls offered twice every 500 ms to
    T0 + 15 s: (the debt right after A's end, the calls admitted)."""
    lease = 60_000 if ending == "release" else 1_000
    first = await authorize(a, toks(100, lease_ms=lease, on_expiry=on_expiry))
    await authorize(a, toks(100, lease_ms=60_000))
    advance([a], 2_000)
    if ending != "release":
        # Denied, and it reclaims A's ended lease on its way (charges it, on_expiry charge).
        assert not (await authorize(a, toks(100)))["allowed"]
    rid = first["reservation_id"]
    if ending in ("release", "late-release"):
        await release(a, rid)
        await release(a, rid)  # a replay changes nothing
    elif ending.startswith("late-settle"):
        tokens = int(ending.partition(":")[2] or 100)
        await settle(a, rid, tokens)
        await settle(a, rid, tokens)
    debt = field(rc, DEBT) or 0
    return debt, await admitted([a], toks(100), steps=26, step_ms=500)


# Burst 100: a call passes while the debt is at most 100 x 10,000. A and B: 2,000,000 at
# T0; 2 s on, 1,600,000 less A's 1,000,000 given back once: 600,000, one call passes at
# once and one each 5 s from T0 + 5 s (3 to T0 + 15 s; given back twice: 4). A kept (its
# settle at its estimate writes nothing, the denied call neither): the debt as B's
# authorize wrote it, a call each 5 s from T0 + 5 s (2).
@pytest.mark.parametrize(
    ("ending", "on_expiry", "debt", "calls"),
    [
        ("release", "release", 600_000, 3),  # in time
        ("late-release", "release", 600_000, 3),  # after its lease was reclaimed: the same
        ("late-settle", "release", 2_000_000, 2),  # settled at its estimate
        ("late-settle:0", "release", 600_000, 3),  # no tokens: as a release
        # 300 tokens: 1,600,000 + 200 x 10,000 more, 13 s to pay down: none to T0 + 15 s
        ("late-settle:300", "release", 3_600_000, 0),
        ("none", "release", 2_000_000, 2),  # a lease's end gives no tokens back
        ("late-release", "charge", 2_000_000, 2),  # charged at its lease's end: kept
        ("late-settle", "charge", 2_000_000, 2),
    ],
)
async def test_tokens_of_an_ended_lease_go_back_once(
    replicas: Replicas,
    redis_client: redis.Redis,
    ending: str,
    on_expiry: str,
    debt: int,
    calls: int,
) -> None:
    (a,) = await replicas(TPM_200)
    assert await _ended(a, redis_client, ending, on_expiry) == (debt, calls)


async def test_a_charge_hold_released_after_its_lease_behind_a_backlog_is_charged(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    """`on_expiry: charge`: a hold unsettled at its lease's end is charged its estimate,
    whether or not reclaim has come to it when a late release arrives (reclaim takes 32
    ended leases a call). Behind 40 ended leases, as with none: the release finds it
    settled (charged $0.10), and its 100 tokens stay on the limiter."""
    org = {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10,
           "period": "daily", "on_exceed": "block"}  # fmt: skip
    doc = {**TPM_200, "budgets": [org]}
    (a,) = await replicas(doc)
    for _ in range(40):
        await authorize(a, {"estimated_usd": 0.01, "lease_ms": 100})
    charged = await authorize(a, toks(100, lease_ms=200, on_expiry="charge"))
    assert charged["allowed"]
    advance([a], 1_000)
    out = await release(a, charged["reservation_id"])
    assert (out["state"], out["cost_usd"], out["replayed"]) == ("settled", 0.1, True)
    assert field(redis_client, DEBT) == 100 * 10_000
    status, budget = await call(a, "GET", "/v1/budgets/org/status")
    assert status == 200 and budget["used_usd"] == 0.1, budget
