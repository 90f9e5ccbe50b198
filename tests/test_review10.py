"""Review of three commits: the grant charges' move, the state check's batched stop reads,
and the decisions that name their tenant's state marker (LOST, -8) after a Redis loss.

Each test attacks one promise on a real redis-server, with the app in-process (a fake
clock; no sleeps between a loss and the calls that must see it):

1. the stops go back before a gone marker is written again (written first, a call between
   the two found the marker there and the stop gone, and passed);
2. a check that raises what no one expected, or hangs, leaves the decision to the fail
   mode, never a 500 or a wait without end;
3. a decision cancelled (its client gone) while it waits for the check: the check still
   puts the stops back, for the callers after it;
4. callers that share an idempotency key through a loss hold once;
5. a flush in the middle of a BACKLOG drain: the decision after it still sees the stop;
6. a tenant named "defs" (its slot is the definitions' slot) names its marker too;
7. a check whose batch of stop reads partly failed leaves no read running past it, and
   keeps what the last whole check saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.api.app import ENGINE, STATE_WATCH
from sidecar.engine import Engine
from sidecar.fail_open import is_grant_id
from sidecar.keys import state_marker, tenant_keys
from sidecar.model import Scope
from sidecar.schemas import AuthorizeRequest
from sidecar.state_loss import StateWatch
from sidecar.stops import Stop
from sidecar.store import StoreUnavailable
from tests.harness import RedisServer
from tests.inprocess import app_over, call

TENANT = tenant_keys("default")
BUDGET = {"id": "org", "name": "Org", "scope": "organization", "period": "monthly",
          "limit_usd": 100, "on_exceed": "block", "alert_thresholds": []}  # fmt: skip
CLOSED = {"budgets": [BUDGET], "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000}}
OPEN = {"budgets": [BUDGET], "settings": {"fail_mode": "open", "redis_timeout_ms": 2000}}
STOPPED = {"agent_id": "runaway", "estimated_usd": 0.01}

Client = TestClient[Any, Any]


@pytest.fixture
async def start(server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """start(doc) -> a started TestClient of the app over the test's own redis-server."""
    clients: list[Client] = []

    async def make(doc: dict[str, Any]) -> Client:
        c = await app_over(server.url, doc)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


async def post(client: Client, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    return await call(client, "POST", path, body)


def watch_of(c: Client) -> StateWatch:
    """The app's state watch, with the definitions' poll turned off: after a FLUSHALL its
    next poll (every POLL_S) would run a check of its own, racing the decision that is to
    notice the loss first."""
    watch: StateWatch = c.app[STATE_WATCH]  # type: ignore[index]

    async def no_poll() -> None:
        return None

    watch.definitions.poll_once = no_poll  # type: ignore[method-assign]
    return watch


async def stopped(c: Client, entity: str = "runaway") -> StateWatch:
    """A stop on agent `entity`, and a check that has seen it (and its tenant's marker)."""
    status, stop = await post(c, "/v1/stops", {"scope": "agent", "scope_id": entity,
                                               "reason": "loop"})  # fmt: skip
    assert status == 201, stop
    watch = watch_of(c)
    # The decisions' scripts loaded: a first EVALSHA's NOSCRIPT would start a check of its
    # own in the background (check_soon), racing the decision that is to notice the loss.
    for path in ("/v1/authorize", "/v1/check"):
        status, decision = await post(c, path, STOPPED)
        assert status == 200 and not decision["allowed"], decision
    await watch.check()
    assert watch.engine.marked == {"default": state_marker("default")}
    return watch


class Gate:
    """Holds every call of an async method at its start until opened; `entered` is set
    when the first call waits there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            await self.open.wait()
            return await fn(*args, **kwargs)

        return gated


async def first_of(*aws: Any) -> None:
    """Until the first of these tasks/futures is done (the others keep running)."""
    await asyncio.wait([asyncio.ensure_future(a) for a in aws], return_when="FIRST_COMPLETED")


# ---- 1. the stops go back before the marker ------------------------------------------------


async def test_a_call_during_the_checks_restore_does_not_pass_the_stop(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """The check wrote a gone marker again (SET NX) before it put the stops back: a call
    in between named the marker, found it there, and was decided without the stop. Here
    the check is held at its first restore; a call made meanwhile must not be allowed."""
    c = await start(CLOSED)
    watch = await stopped(c)
    gate = Gate()
    watch.stops.restore = gate.wrap(watch.stops.restore)  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    checking = asyncio.create_task(watch.check())
    await asyncio.wait_for(gate.entered.wait(), 10)  # the check is putting the stop back
    waits = asyncio.Event()
    after_loss = watch.after_loss

    async def noted() -> None:
        waits.set()
        await after_loss()

    watch.engine.after_loss = noted
    call = asyncio.create_task(post(c, "/v1/authorize", STOPPED))
    # Either the call was decided at once (the marker was written: the defect), or it
    # found the marker gone and waits for a check.
    await asyncio.wait_for(first_of(call, waits.wait()), 15)
    gate.open.set()
    assert await asyncio.wait_for(checking, 15) is True
    status, decision = await call
    assert status == 200 and not decision["allowed"], decision
    assert "loop" in decision["message"], decision
    assert watch.losses == 1 and watch.last_loss is not None
    assert watch.last_loss.restored_stops == 1
    with server.client() as rc:
        assert rc.hget(state_marker("default"), "id") is not None  # written, after the stop
        assert not [f for f in rc.hgetall(TENANT.counters) if f.startswith("h:")]


# ---- 2. a check that raises or hangs ------------------------------------------------------


@pytest.mark.parametrize("doc", [CLOSED, OPEN], ids=["closed", "open"])
async def test_a_check_that_raises_leaves_the_decision_to_the_fail_mode(
    start: Callable[..., Any], server: RedisServer, doc: dict[str, Any]
) -> None:
    """_after_loss turned only Redis and store errors into the fail mode: anything else
    the check raised (here the definitions' reload after the loss) was a 500."""
    c = await start(doc)
    watch = await stopped(c)

    async def broken() -> None:
        raise RuntimeError("definitions reload broke")

    watch.definitions.reload = broken  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    status, decision = await post(c, "/v1/authorize", {"agent_id": "ok", "estimated_usd": 0.01})
    if doc is CLOSED:
        assert status == 503, decision
    else:
        assert status == 200 and decision["allowed"] and decision["degraded"], decision
        assert is_grant_id(decision["reservation_id"]), decision  # charged once Redis answers
    with server.client() as rc:  # the LOST script changed nothing: nothing held
        assert not [f for f in rc.hgetall(TENANT.counters) if f.startswith("h:")]


async def test_a_check_that_hangs_leaves_the_decision_to_the_fail_mode(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """A check stuck after the loss (Redis slow to answer it): the decision waits
    _AFTER_LOSS_S (2 s) for it, then answers the fail mode; it does not wait for ever."""
    c = await start(CLOSED)
    watch = await stopped(c)
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    watch.definitions.reload = stuck  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    status, decision = await post(c, "/v1/authorize", STOPPED)
    assert status == 503, decision
    # The check is still running; the app's shutdown (fixture) cancels it.
    assert watch._serving is not None and not watch._serving.done()


# ---- 3. a waiting decision cancelled ------------------------------------------------------


async def test_a_decision_cancelled_while_it_waits_leaves_the_check_to_finish(
    start: Callable[..., Any], server: RedisServer
) -> None:
    c = await start(CLOSED)
    watch = await stopped(c)
    engine: Engine = c.app[ENGINE]  # type: ignore[index]
    gate = Gate()
    watch.stops.restore = gate.wrap(watch.stops.restore)  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    req = AuthorizeRequest(agent_id="x", estimated_usd=0.01)
    gone = asyncio.create_task(engine.authorize("default", req))
    await asyncio.wait_for(gate.entered.wait(), 10)  # its check runs (held at the restore)
    assert len(watch._waiting) == 0 and watch._serving is not None
    gone.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await gone
    gate.open.set()
    await asyncio.wait_for(watch._serving, 10)  # the check ran to its end all the same
    assert watch.losses == 1 and watch.last_loss is not None
    assert watch.last_loss.restored_stops == 1
    status, decision = await post(c, "/v1/authorize", STOPPED)
    assert status == 200 and not decision["allowed"], decision
    await engine.close()  # the cancelled authorize's cancel (release) is retried, then done
    with server.client() as rc:
        assert not [f for f in rc.hgetall(TENANT.counters) if f.startswith("h:")]


# ---- 4. one idempotency key through a loss ------------------------------------------------


async def test_callers_with_one_idempotency_key_hold_once_through_a_loss(
    start: Callable[..., Any], server: RedisServer
) -> None:
    c = await start(CLOSED)
    await stopped(c)
    with server.client() as rc:
        rc.flushall()
    body = {"agent_id": "ok", "estimated_usd": 0.25, "idempotency_key": "k-1"}
    answers = await asyncio.gather(*(post(c, "/v1/authorize", body) for _ in range(10)))
    assert {s for s, _ in answers} == {200}, answers
    assert len({d["reservation_id"] for _, d in answers}) == 1, answers
    assert sum(not d["replayed"] for _, d in answers) == 1, answers
    with server.client() as rc:
        held = [v for f, v in rc.hgetall(TENANT.counters).items() if f.startswith("h:")]
    assert held == ["250000"]


# ---- 5. a flush in the middle of a backlog's drain ----------------------------------------


async def test_a_flush_during_a_backlog_drain_still_finds_the_stop(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """40 leases ended unreturned (more than the 32 a decision returns): the stopped
    agent's call answers BACKLOG and the sidecar drains them (reclaim.lua); Redis is
    flushed just before the drain's first batch. The call asked again names the marker,
    finds it gone, and is decided once the stop is back."""
    c = await start(CLOSED)
    engine: Engine = c.app[ENGINE]  # type: ignore[index]
    for i in range(40):
        status, held = await post(c, "/v1/authorize", {"agent_id": f"a{i}",
                                                       "estimated_usd": 0.01,
                                                       "lease_ms": 1000})  # fmt: skip
        assert status == 200 and held["allowed"], held
    watch = await stopped(c)
    engine._clock.advance(5000)  # type: ignore[attr-defined]
    store = engine._store
    run = store.run
    flushed = []

    async def flush_first(script: Any, keys: Any, args: Any) -> Any:
        if script.name == "reclaim" and not flushed:
            with server.client() as rc:
                rc.flushall()
            flushed.append(script.name)
        return await run(script, keys, args)

    store.run = flush_first  # type: ignore[method-assign]
    status, decision = await post(c, "/v1/authorize", STOPPED)
    assert flushed == ["reclaim"]  # the drain ran, and the flush came in its middle
    assert status == 200 and not decision["allowed"], decision
    assert "loop" in decision["message"], decision
    assert watch.losses == 1


# ---- 6. a tenant named "defs" -------------------------------------------------------------


async def test_a_tenant_named_defs_names_its_marker_too(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """bs:{defs}:epoch is both tenant "defs"'s marker and the definitions'. The check's
    marker map gave that key to the definitions (""), so Engine.marked left tenant "defs"
    out: its decisions named no marker, and after a FLUSHALL its stopped agent was allowed
    until the next background check."""
    doc = {**CLOSED, "auth": {"clients": [
        {"client_id": "agent", "tenant": "defs", "role": "agent", "secret": "pw"}]}}  # fmt: skip
    c = await start(doc)
    watch = watch_of(c)
    engine: Engine = c.app[ENGINE]  # type: ignore[index]
    await watch.stops.create("defs", Scope.AGENT, "runaway", "loop", None)
    stop = AuthorizeRequest(agent_id="runaway", estimated_usd=0.01)
    assert not (await engine.authorize("defs", stop)).allowed  # (authorize.lua loaded)
    await watch.check()
    assert engine.marked == {"defs": state_marker("defs")}
    with server.client() as rc:
        rc.flushall()
    decision = await engine.authorize("defs", stop)
    assert not decision.allowed and "loop" in (decision.message or ""), decision
    assert watch.losses == 1


# ---- 7. a check whose stop reads partly failed --------------------------------------------


async def test_a_failed_batch_of_stop_reads_ends_every_read_and_keeps_the_last_whole_check(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """One read of a batch fails: asyncio.gather raised it and left the batch's other
    reads running past the check's end (and its lock). Each is ended before the check
    raises; nothing of the failed check is kept, so a later loss puts back what the last
    whole check saw."""
    tenants = [f"t{i:02d}" for i in range(20)]
    doc = {**CLOSED, "auth": {"clients": [
        {"client_id": f"c-{t}", "tenant": t, "role": "agent", "secret": "pw"}
        for t in tenants]}}  # fmt: skip
    c = await start(doc)
    watch = watch_of(c)
    for t in tenants:
        await watch.stops.create(t, Scope.AGENT, "runaway", f"stopped {t}", None)
    await watch.check()
    read = watch.stops.list
    started: list[asyncio.Task[Any]] = []
    never = asyncio.Event()

    async def failing(tenant: str) -> list[Stop]:
        started.append(asyncio.current_task())  # type: ignore[arg-type]
        if tenant == "t03":
            raise StoreUnavailable("read failed")
        await never.wait()
        return await read(tenant)

    watch.stops.list = failing  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await watch.check()
    assert len(started) == 16  # the first batch
    assert all(t.done() for t in started), [t for t in started if not t.done()]
    watch.stops.list = read  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    assert await watch.check() is True
    assert watch.last_loss is not None and watch.last_loss.restored_stops == len(tenants)
    for t in tenants:
        assert [s.reason for s in await read(t)] == [f"stopped {t}"]


# ---- 8. a loss whose handling failed half way ---------------------------------------------


async def test_a_loss_whose_notice_failed_is_noticed_by_the_next_check(
    start: Callable[..., Any], server: RedisServer
) -> None:
    """The check wrote the gone markers again, then its handling of the loss failed (here
    the definitions' reload; an XADD of the alert on a Redis out of memory as well): the
    next check found the markers as it had just written them, so the loss went unsaid (no
    alert, nothing in /readyz, not counted). The next check must say it."""
    c = await start(CLOSED)
    watch = await stopped(c)
    reload = watch.definitions.reload
    failures = [RuntimeError("definitions reload broke")]

    async def once_broken() -> None:
        if failures:
            raise failures.pop()
        await reload()

    watch.definitions.reload = once_broken  # type: ignore[method-assign]
    with server.client() as rc:
        rc.flushall()
    with pytest.raises(RuntimeError):
        await watch.check()
    assert await watch.check() is True
    assert watch.losses == 1 and watch.last_loss is not None
    assert watch.last_loss.tenants == ["default"]
    with server.client() as rc:
        alerts = [fields for _, fields in rc.xrange(TENANT.alerts)]
        stops = [f for f in rc.hgetall(TENANT.counters) if f.startswith("s:agent:")]
    assert [a["k"] for a in alerts if a["k"] == "lost"] == ["lost"], alerts
    assert len(stops) == 1  # put back once (the second restore found it there)
    status, decision = await post(c, "/v1/authorize", STOPPED)
    assert status == 200 and not decision["allowed"], decision


# ---- 9. Redis Cluster: the marker in the slot of every key a decision names ---------------


@pytest.mark.parametrize(
    "tenant", ["default", "defs", "a}b", "{x}", "}{", "t%7Bx", "ünï", "\udcff", "", "a b\n"]
)
def test_the_marker_is_in_the_slot_of_every_key_a_decision_names(tenant: str) -> None:
    """A Lua script on Redis Cluster may name keys of one slot only (CROSSSLOT). The
    marker is the last key of authorize and check: for tenants whose names hold braces,
    escapes, unicode or a lone surrogate, it hashes to the slot of the tenant's others."""
    from redis.crc import key_slot

    from sidecar.keys import loop_key

    tk = tenant_keys(tenant)
    named = [*tk.learning("20260310"), loop_key(tenant, "g{1}", "e}"), state_marker(tenant)]
    slots = {key_slot(k.encode("utf-8", "surrogatepass")) for k in named}
    assert len(slots) == 1, (tenant, named)


# ---- 10. make test on two xdist workers: cluster ports -------------------------------------


def test_cluster_ports_stay_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/cluster_harness.py chose ports from 21,000 up (each xdist worker 2,000
    further) and so bus ports (+10000) from 31,000 to 39,000, inside the kernel's
    ephemeral range (32768-60999 here): with the suite on two workers, the other worker's
    connections take ports from that range at any moment, between the harness's check
    that a port is free and the node's bind (the cluster then fails to start). For each
    of four workers, at any millisecond."""
    from tests import cluster_harness

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for worker in range(4):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        for ms in (0, 39, 119, 499):
            monkeypatch.setattr(cluster_harness.time, "time", lambda ms=ms: ms / 1000)
            ports = cluster_harness.cluster_ports(8)
            assert len(set(ports)) == 8
            assert max(ports) + 10000 < low, (worker, ms, ports, low)
            assert min(ports) >= 20_000  # above every worker's free_port() range
