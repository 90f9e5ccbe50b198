"""Noticing that Redis lost its state, saying so, and putting back what a sidecar can.

A redis-server restarted without persistence (or with its dump gone), a FLUSHALL, a
failover to an empty replica: counters, holds, rate-limit windows, idempotency keys,
learned estimates, the admin API's definitions and the stops are gone, while the sidecars
go on serving. Zeroed counters allow a whole new period's spend: nothing here can bring
that money back, but it must not pass in silence.

Every sidecar keeps a marker in each slot it depends on (keys.state_marker per tenant,
keys.DEFS_EPOCH for the definitions), a random id written with SET NX by the check the
sidecar runs before it serves (so the marker is there before anything it guards: its
presence never depends on when a background task ran). A check, off
the hot path (every CHECK_S, at once after a NOSCRIPT, and when the definitions' version
went backwards), reads the markers in one pipeline: a marker gone, or holding another id
than the one this sidecar saw, means that slot lost its state. Then the sidecar

- logs an error line and counts it (`on_loss`: budget_sidecar_store_state_lost_total);
- shows it in /readyz (`state_lost`: when, which tenants, what it put back); readiness
  stays 200: every replica shares the store, so failing them all would only add an outage;
- appends an alert (kind `lost`, alert_type store_state_lost) to each tenant's alerts
  stream, delivered like every alert (webhooks);
- puts back the stops it saw in force at its last check, as they were (same id, expiry,
  reason), with the stops made or lifted through this sidecar since (it knows of those:
  one lifted here on purpose stays lifted): a stop that silently disappears is a safety
  problem, and a stop lifted on another replica within the last check interval coming
  back is the safe error;
- puts back the admin API's definitions as it last loaded them (only those absent: the
  first replica to notice writes them, the others find them there);
- makes a settle or release of a reservation the loss took answer 404 saying so.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar import keys, tasks
from sidecar.definitions import DefinitionWatcher
from sidecar.engine import Engine
from sidecar.periods import iso
from sidecar.stops import Stop, Stops
from sidecar.store import StoreError

log = logging.getLogger("sidecar.state_loss")
T = TypeVar("T")

# Every this often (a restart or failover is noticed at once, by its NOSCRIPT; a FLUSHALL,
# which keeps the scripts, by this check or by the definitions' version going back).
CHECK_S = 5.0
# The markers' expiry, pushed out by every check: a store no sidecar checks for this long
# loses them (bounded storage); a sidecar started after that sees no loss (it knew none).
MARKER_TTL_S = 30 * 86_400
STARTUP_CHECK_S = 2.0  # how long start-up waits for the first check
ALERTS_MAX = 10_000  # as lua/_lib.lua's
STOP_READS = 16  # tenants whose stops a check reads at once
ALERT_KIND = "lost"


class LossView(msgspec.Struct):
    """The last loss this sidecar noticed, as /readyz shows it."""

    at: str
    tenants: list[str]
    restored_stops: int
    restored_definitions: int
    count: int


@dataclass
class StateWatch:
    client: aioredis.Redis
    engine: Engine
    stops: Stops
    definitions: DefinitionWatcher
    on_loss: Callable[[], None] | None = None
    interval_s: float = CHECK_S
    last_loss: LossView | None = None
    losses: int = 0
    # marker key -> the id this sidecar saw there
    _epochs: dict[str, str] = field(default_factory=dict)
    # tenant -> the stops in force at the last check that found its marker intact
    _stops: dict[str, list[Stop]] = field(default_factory=dict)
    # this sidecar's own stop changes since the running check began (see stop_changed)
    _changes: list[tuple[str, Stop | None, str | None]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _soon: asyncio.Task[None] | None = None
    # Decisions that found a marker gone, waiting for a check begun after they did.
    _waiting: list[asyncio.Future[None]] = field(default_factory=list)
    _serving: asyncio.Task[None] | None = None

    def _tenants(self) -> list[str]:
        return sorted(self.engine.tenants() | set(self.definitions.store.loaded) | set(self._stops))

    async def check(self) -> bool:
        """One check; True when it found (and handled) a loss."""
        async with self._lock:
            self._changes.clear()
            tenants = self._tenants()
            now = self.engine.now_ms()
            # The stops are read before the markers: a loss after this read is caught by
            # the markers, so what is kept below was read before any loss.
            seen = await self._read_stops(tenants, now)
            markers = {keys.state_marker(t): t for t in tenants}
            markers[keys.DEFS_EPOCH] = ""  # the definitions' own slot
            pipe = self.client.pipeline(transaction=False)
            for key in markers:
                pipe.getex(key, ex=MARKER_TTL_S)
            values = await pipe.execute()
            found = dict(zip(markers, values, strict=True))
            lost = {
                tenant
                for key, tenant in markers.items()
                if key in self._epochs and found[key] != self._epochs[key]
            }
            if "" in lost:  # a tenant named "defs" has the definitions' marker as its own
                lost |= {t for t in tenants if keys.state_marker(t) == keys.DEFS_EPOCH}
            # The stops go back before a gone marker is written again: a decision (here or
            # on another replica) that finds the marker gone waits for a check, one that
            # finds it written is decided on the stops there. Written first, the calls in
            # between passed every stop the loss took.
            restored = await self._restore_stops(lost, now) if lost else 0
            before = dict(self._epochs)
            await self._write_markers(found)
            self._epochs.update((k, str(v)) for k, v in found.items() if v is not None)
            # What decisions name from now on (the marker of each slot seen written). Not
            # from `markers`: a tenant named "defs" has the definitions' marker as its own.
            self.engine.marked = {
                t: keys.state_marker(t) for t in tenants if keys.state_marker(t) in self._epochs
            }
            if lost:
                try:
                    await self._lost(lost, now, restored)
                except BaseException:
                    # Not said (no alert, /readyz, count): the next check must find this
                    # loss again, not the markers it wrote as if they were always there.
                    self._epochs.update((k, before[k]) for k, t in markers.items()
                                        if t in lost and k in before)  # fmt: skip
                    raise
            for tenant in tenants:
                if tenant not in lost:
                    kept = seen[tenant]
                    # A change made here while this check read: `seen` may predate it.
                    for changed, made, lifted in self._changes:
                        if changed == tenant:
                            kept = _changed(kept, made, lifted)
                    self._stops[tenant] = kept
            return bool(lost)

    async def _read_stops(self, tenants: list[str], now: int) -> dict[str, list[Stop]]:
        """Every tenant's stops, STOP_READS tenants' reads in flight at once: a check over
        many tenants takes a few round trips, not one after the other per tenant, and
        opens no more than STOP_READS connections for it."""
        found = await _batched(tenants, lambda t: self.stops.list(t, now))
        return dict(zip(tenants, found, strict=True))

    async def _write_markers(self, found: dict[str, str | None]) -> None:
        """Write a new marker where `found` has none (SET NX: where another replica wrote
        one first, read it), in two pipelines, and note it in `found`."""
        gone = [k for k, v in found.items() if v is None]
        if not gone:
            return
        fresh = {k: f"ep_{secrets.token_hex(8)}" for k in gone}
        pipe = self.client.pipeline(transaction=False)
        for key in gone:
            pipe.set(key, fresh[key], nx=True, ex=MARKER_TTL_S)
        wrote = await pipe.execute()
        theirs = [k for k, ok in zip(gone, wrote, strict=True) if not ok]
        for key in gone:
            found[key] = fresh[key]
        if theirs:
            pipe = self.client.pipeline(transaction=False)
            for key in theirs:
                pipe.get(key)
            found.update(zip(theirs, await pipe.execute(), strict=True))

    def stop_changed(self, tenant: str, made: Stop | None, lifted: str | None) -> None:
        """A stop made or lifted through this sidecar (Stops.on_change): what a loss would
        put back follows at once, since a loss before the next check must neither bring
        back a stop lifted here on purpose nor lose one made here."""
        self._stops[tenant] = _changed(self._stops.get(tenant, []), made, lifted)
        self._changes.append((tenant, made, lifted))

    def _lost_tenants(self, lost: set[str]) -> list[str]:
        # "" is the definitions' own slot: losing it loses them for every tenant.
        return sorted(t for t in lost if t) or self._tenants()

    async def _restore_stops(self, lost: set[str], now: int) -> int:
        """Put back the stops seen in force at the last check in the tenants' slots that
        lost their state; how many went back. Not for the definitions' slot ("") alone:
        no stop lives there, and the tenants' slots kept theirs (on a Redis Cluster), so
        putting them back would only bring back a stop lifted on another replica since."""

        async def each(tenant: str) -> int:
            restored = 0
            for stop in self._stops.get(tenant, []):
                restored += await self.stops.restore(tenant, stop, now)
            return restored

        return sum(await _batched(sorted(t for t in lost if t), each))

    async def _lost(self, lost: set[str], now: int, restored_stops: int) -> None:
        tenants = self._lost_tenants(lost)
        restored_defs = await self.definitions.store.restore(None if "" in lost else set(tenants))
        await self.definitions.reload()  # (refresh would ask this check again: the lock)
        self.losses += 1
        self.last_loss = LossView(
            at=iso(now),
            tenants=tenants,
            restored_stops=restored_stops,
            restored_definitions=restored_defs,
            count=self.losses,
        )
        self.engine.state_lost_at = iso(now)
        message = (
            "Redis lost its state (restarted empty, flushed, or failed over to an empty "
            "replica): counters, holds, rate-limit windows, idempotency keys and learned "
            "estimates restart from zero, so spend before the loss is not counted against "
            f"the caps; this sidecar put back {restored_stops} stops and "
            f"{restored_defs} admin API definitions"
        )
        log.error(
            "budget store lost its state; %s",
            message,
            extra={"tenants": tenants, "restored_stops": restored_stops,
                   "restored_definitions": restored_defs},
        )  # fmt: skip
        pipe = self.client.pipeline(transaction=False)  # one round trip, not one a tenant
        for tenant in tenants:
            tk = keys.tenant_keys(tenant)
            # g: the marker the lost slot holds now, the same on every replica that noticed
            # (the alert's id: sidecar.alerts); the definitions' when only theirs was lost.
            marker = keys.state_marker(tenant) if tenant in lost else keys.DEFS_EPOCH
            pipe.xadd(
                tk.alerts,
                {"k": ALERT_KIND, "g": self._epochs.get(marker, ""),
                 "s": "", "e": keys.escape(tenant), "r": message, "at": now},
                maxlen=ALERTS_MAX,
                approximate=True,
            )  # fmt: skip
        await pipe.execute()
        if self.on_loss is not None:
            self.on_loss()

    async def after_loss(self) -> None:
        """A decision found its tenant's marker gone: wait for a check that begins after
        that (one check for every decision waiting when it begins: a check running already
        may have read the marker before it went). Raises what the check raised."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if self._serving is None or self._serving.done():
            self._serving = asyncio.get_running_loop().create_task(self._serve_waiting())
        await waiter  # a decision cancelled meanwhile cancels only its own waiter

    async def _serve_waiting(self) -> None:
        while self._waiting:
            waiting, self._waiting = self._waiting, []
            try:
                await self.check()
            except Exception as exc:
                if not isinstance(exc, (RedisError, OSError, StoreError)):
                    log.exception("state marker check error")
                for waiter in waiting:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)

    def check_soon(self) -> None:
        """Check now, in the background (a NOSCRIPT: perhaps a restarted Redis)."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.get_running_loop().create_task(self._quietly())

    async def _quietly(self) -> None:
        try:
            await self.check()
        except (RedisError, OSError, StoreError) as exc:
            # Redis away: the fail mode covers the decisions; the next check tries again.
            log.warning("cannot check the budget store's state marker: %s", exc)
        except Exception:  # a watch that dies silently would be worse
            log.exception("state marker check error")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._quietly()

    async def lifecycle(self) -> AsyncIterator[None]:
        # The first check before serving writes the markers (a Redis away at start-up:
        # the next check does; the fail mode covers the decisions meanwhile).
        try:
            async with asyncio.timeout(STARTUP_CHECK_S):
                await self._quietly()
        except TimeoutError:
            log.warning("the budget store's state marker is not written yet: Redis is slow")
        task = asyncio.get_running_loop().create_task(self.run())
        yield
        pending = [task, *(t for t in (self._soon, self._serving) if t is not None)]
        await tasks.stop(pending, what="state marker checks")


async def _batched(tenants: list[str], each: Callable[[str], Awaitable[T]]) -> list[T]:
    """`each` of every tenant, STOP_READS at once (a round trip per batch, not per tenant,
    and no more connections than that); the results in `tenants`' order. One that fails
    (or the check cancelled) ends the rest of its batch before it raises: gather alone
    leaves them running past the check's end (and its lock)."""
    out: list[T] = []
    for i in range(0, len(tenants), STOP_READS):
        batch = [asyncio.ensure_future(each(t)) for t in tenants[i : i + STOP_READS]]
        try:
            out += await asyncio.gather(*batch)
        except BaseException:
            for task in batch:
                task.cancel()
            await asyncio.gather(*batch, return_exceptions=True)
            raise
    return out


def _changed(stops: list[Stop], made: Stop | None, lifted: str | None) -> list[Stop]:
    """`stops` after one change; one stop per entity, so a stop made replaces its entity's."""
    kept = [
        s
        for s in stops
        if s.id != lifted and (made is None or (s.scope, s.scope_id) != (made.scope, made.scope_id))
    ]
    return [*kept, made] if made is not None else kept
