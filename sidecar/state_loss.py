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
  reason; one whose expiry has passed on the stops' clock, Redis TIME, stays ended),
  with the stops made or lifted through this sidecar since (it knows of those:
  one lifted here on purpose stays lifted): a stop that silently disappears is a safety
  problem, and a stop lifted on another replica within the last check interval coming
  back is the safe error;
- puts back the admin API's definitions as it last loaded them (only those absent: the
  first replica to notice writes them, the others find them there);
- makes a settle or release of a reservation the loss took answer 404 saying so.

Redis restored from an OLDER dump (last night's backup, a replica far behind promoted, a
stale dump.rdb loaded after a persistence failure) keeps the markers' ids: they were
written before the dump. So each marker also holds a generation (lua/state_marker.lua),
one more at every check of every sidecar, and each sidecar remembers the one it saw last:
a check that finds the same id with a generation not above it knows the store went back
to before that check, a rollback (kind `rolled_back`; `lost` for the rest). Generations
only grow, so another replica's checks never look like one; the sidecar that notices
first replaces the id (with an `rb_` one, only if it is still the rolled-back one), so
every other sidecar finds it changed, and a changed id starting `rb_` is a rollback too.
It is handled as a loss, with two differences, since the store holds old state rather than
none: the stops this sidecar knows were lifted (through it, or gone between two of its
checks) and the old dump brought back are lifted again, before the ones it saw are put
back; and an admin API budget the dump holds in an older version (its updated_at) than
the one this sidecar last loaded is written back at that version.

A rollback is seen only when a check of this sidecar ran after the dump was taken: a dump
younger than every sidecar's last check looks like no rollback (it loses at most the
spend of one check interval).

A Redis that EVICTS (maxmemory set, maxmemory-policy anything but noeviction) deletes
keys at its memory limit without telling anyone: a tenant's counters hash (allkeys-*),
holds, stops, loop guards' memory, learned estimates, the markers themselves (volatile-*
too: they carry expiries). The markers cannot see that: an idle tenant's counters go
first while its marker, touched by every check, stays. So the same check reads INFO of
each primary (one call per node per check; INFO works where a managed Redis disables
CONFIG): an evicting policy is said at once (an error line naming the setting and its
fix, a gauge, /readyz `redis_eviction`), and its evicted_keys rising since the last
check is a possible loss of every tenant on that node, since nobody can know which keys
went (kind `evicted`, handled as a loss: counted once per check, stops and definitions
put back; alerted and logged once per tenant per EVICTION_ALERT_MS window, since a
Redis that stays at its limit evicts between every two checks). A node's count is
remembered with its run_id: a restarted or failed-over server starts a count of its own
(its markers say whether it lost anything).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from sidecar import keys, scripts, tasks
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
LIFTED_MAX = 1_000  # stop ids a sidecar remembers as lifted, per tenant (newest kept)
# What kind of loss a check found (LossView.kind, the metric's label).
LOST = "lost"
ROLLED_BACK = "rolled_back"
# Redis evicted keys at its maxmemory since the last check (its INFO's evicted_keys rose).
EVICTED = "evicted"
# A Redis that keeps evicting (a store that stays at its maxmemory) evicts between every
# two checks: its tenants' eviction alert is written once per this window (UTC hours on
# the engine's clock), with one id for every replica (a replica that finds another's entry
# writes none), and its error line once per replica per window; the metric counts every
# check. One alert a check was 720 an hour per tenant and replica, each its own id, which
# pushed the tenant's threshold alerts out of its capped alerts stream within hours.
EVICTION_ALERT_MS = 3_600_000
KINDS = (LOST, ROLLED_BACK, EVICTED)
# The policy that keeps every key (a write past maxmemory is refused: OOM, the fail mode),
# and the fix every line about an evicting Redis names.
NO_EVICTION = "noeviction"
FIX = (
    f"set maxmemory-policy {NO_EVICTION} (redis.conf, CONFIG SET, or the managed "
    "service's parameter group)"
)
# The id a rollback's first noticer gives the marker: others tell a rollback by it.
ROLLBACK_PREFIX = "rb_"
_MARKER = scripts.standalone("state_marker")


class LossView(msgspec.Struct):
    """The last loss this sidecar noticed, as /readyz shows it."""

    at: str
    tenants: list[str]
    restored_stops: int
    restored_definitions: int
    count: int
    # LOST: the slot's marker was gone or changed; ROLLED_BACK: the store went back to an
    # older state (an older dump), its marker's generation below one this sidecar saw.
    kind: str = LOST
    # Stops this sidecar knew were lifted that the older state brought back, lifted again.
    lifted_stops: int = 0


class EvictionView(msgspec.Struct):
    """One Redis primary whose maxmemory-policy evicts keys at maxmemory, as /readyz shows
    it (redis_eviction)."""

    node: str
    policy: str
    maxmemory: int
    evicted_keys: int


def evicts(policy: str, maxmemory: int) -> bool:
    """Whether Redis deletes keys at its memory limit: any policy but noeviction, with a
    limit (maxmemory 0 is none on a 64-bit server)."""
    return maxmemory > 0 and policy != NO_EVICTION


@dataclass
class StateWatch:
    client: aioredis.Redis
    engine: Engine
    stops: Stops
    definitions: DefinitionWatcher
    on_loss: Callable[[str], None] | None = None  # told the kind (LOST, ROLLED_BACK, EVICTED)
    on_evicting: Callable[[bool], None] | None = None  # told, at each check, whether any evicts
    interval_s: float = CHECK_S
    last_loss: LossView | None = None
    losses: int = 0
    # marker key -> the id this sidecar saw there
    _epochs: dict[str, str] = field(default_factory=dict)
    # marker key -> the generation this sidecar saw there last (after its own increment)
    _gens: dict[str, int] = field(default_factory=dict)
    # tenant -> ids of stops this sidecar knows were lifted (oldest first, LIFTED_MAX)
    _lifted: dict[str, list[str]] = field(default_factory=dict)
    # tenant -> the stops in force at the last check that found its marker intact
    _stops: dict[str, list[Stop]] = field(default_factory=dict)
    # this sidecar's own stop changes since the running check began (see stop_changed)
    _changes: list[tuple[str, Stop | None, str | None]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _soon: asyncio.Task[None] | None = None
    # Decisions that found a marker gone, waiting for a check begun after they did.
    _waiting: list[asyncio.Future[None]] = field(default_factory=list)
    _serving: asyncio.Task[None] | None = None
    # Loss alerts whose write failed: (alerts stream, entry), written at the next check.
    _unsent: list[tuple[str, dict[str, str | int]]] = field(default_factory=list)
    # The primaries whose policy evicts, as the last INFO read found them.
    eviction: list[EvictionView] = field(default_factory=list)
    # node -> (its run_id, its evicted_keys) at the last check: a rise is an eviction
    _evicted: dict[str, tuple[str, int]] = field(default_factory=dict)
    # node -> (policy, maxmemory) last said in an error line (said again when they change)
    _said: dict[str, tuple[str, int]] = field(default_factory=dict)
    _info_refused: bool = False  # INFO refused (renamed, an ACL): said once
    _info_failing: bool = False  # the last INFO read of some primary timed out: said once
    # tenant -> the EVICTION_ALERT_MS window of its last eviction alert from this sidecar
    _evict_alerted: dict[str, int] = field(default_factory=dict)

    def _tenants(self) -> list[str]:
        return sorted(self.engine.tenants() | set(self.definitions.store.loaded) | set(self._stops))

    async def check(self) -> bool:
        """One check; True when it found (and handled) a loss."""
        async with self._lock:
            if self._unsent:
                unsent, self._unsent = self._unsent, []
                await self._send_alerts(unsent, again=True)
            self._changes.clear()
            tenants = self._tenants()
            now = self.engine.now_ms()
            # The stops are read before the markers: a loss after this read is caught by
            # the markers, so what is kept below was read before any loss.
            seen = await self._read_stops(tenants)
            # After the stops too: an eviction after this read is the next check's, so
            # the stops kept below were read before any eviction this check misses.
            evicted = await self._read_eviction()
            markers = {keys.state_marker(t): t for t in tenants}
            markers[keys.DEFS_EPOCH] = ""  # the definitions' own slot
            # One script per marker, all in one pipeline (one round trip per node).
            pipe = self.client.pipeline(transaction=False)
            for key in markers:
                # A marker this sidecar knew, gone: not written again before the stops are
                # back (below), so every decision that names it meanwhile, here or on
                # another replica, finds it gone and waits for a check. Written first, the
                # calls in between passed every stop the loss took.
                keep_gone = "1" if key in self._epochs else ""
                pipe.eval(
                    _MARKER, 1, key, MARKER_TTL_S, f"ep_{secrets.token_hex(8)}", "", keep_gone
                )
            replies = await pipe.execute()
            found: dict[str, str] = {}  # tenant ("" the definitions) -> LOST / ROLLED_BACK
            gone: list[str] = []
            # What this sidecar knew, back if saying the loss fails (see below).
            knew = {k: (self._epochs[k], self._gens.get(k)) for k in markers if k in self._epochs}
            for (key, tenant), reply in zip(markers.items(), replies, strict=True):
                if not reply[0]:  # gone (a marker this sidecar knew): a loss
                    found[tenant] = LOST
                    gone.append(key)
                    continue
                value, gen = str(reply[0]), int(reply[1])
                known, saw = self._epochs.get(key), self._gens.get(key)
                if known is not None and value != known:
                    # Gone (a fresh one written), or replaced by a rollback's first noticer.
                    found[tenant] = ROLLED_BACK if value.startswith(ROLLBACK_PREFIX) else LOST
                elif known is not None and saw is not None and gen <= saw:
                    # The same id, a generation this sidecar's own last check passed: the
                    # store is older than that check. Tell the others by a new id (only if
                    # still this one: a second noticer keeps the first's).
                    fresh = f"{ROLLBACK_PREFIX}{secrets.token_hex(8)}"
                    reply = await self.client.eval(_MARKER, 1, key, MARKER_TTL_S, fresh, value)
                    value, gen = str(reply[0]), int(reply[1])
                    found[tenant] = ROLLED_BACK
                self._epochs[key] = value
                self._gens[key] = gen
            if "" in found:  # a tenant named "defs" has the definitions' marker as its own
                found.update(
                    {t: found[""] for t in tenants if keys.state_marker(t) == keys.DEFS_EPOCH}
                )
            if evicted:
                # Every slot of a node that evicted may have lost keys: said as an eviction
                # (a marker gone with them was most likely evicted too), a rollback kept.
                for key, tenant in markers.items():
                    if self._node_of(key) in evicted and found.get(tenant) != ROLLED_BACK:
                        found[tenant] = EVICTED
            kinds = {kind: {t for t, k in found.items() if k == kind} for kind in KINDS}
            put_back = {kind: await self._put_back(of_kind) for kind, of_kind in kinds.items()}
            if gone:  # the stops back: the markers again
                pipe = self.client.pipeline(transaction=False)
                for key in gone:
                    pipe.eval(_MARKER, 1, key, MARKER_TTL_S, f"ep_{secrets.token_hex(8)}", "")
                for key, reply in zip(gone, await pipe.execute(), strict=True):
                    self._epochs[key], self._gens[key] = str(reply[0]), int(reply[1])
            # What decisions name from now on (the marker of each slot seen written). Not
            # from `markers`: a tenant named "defs" has the definitions' marker as its own.
            self.engine.marked = {
                t: keys.state_marker(t) for t in tenants if keys.state_marker(t) in self._epochs
            }
            try:
                for kind, of_kind in kinds.items():
                    if of_kind:
                        await self._lost(of_kind, now, kind, *put_back[kind])
            except BaseException:
                # Not said (no alert, /readyz, count): the next check must find this loss
                # again, not the markers it wrote as if they were always there.
                for key, (epoch, had) in knew.items():
                    if markers[key] in found:
                        self._epochs[key] = epoch
                        if had is not None:
                            self._gens[key] = had
                raise
            for tenant in tenants:
                if tenant not in found:
                    kept = seen[tenant]
                    # A change made here while this check read: `seen` may predate it.
                    for changed, made, lifted in self._changes:
                        if changed == tenant:
                            kept = _changed(kept, made, lifted)
                    # Gone since the last check (lifted elsewhere, replaced, or ended): an
                    # older state brought back must not bring these back in force.
                    ids = {s.id for s in kept}
                    self._forget([s.id for s in self._stops.get(tenant, []) if s.id not in ids],
                                 tenant)  # fmt: skip
                    self._stops[tenant] = kept
            return bool(found)

    def _node_of(self, key: str) -> str:
        """The node (as _read_eviction names it) that holds `key`."""
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(key)
            return str(node.name) if node is not None else ""
        return self._standalone_name()

    def _standalone_name(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        if "host" in kwargs:
            return f"{kwargs['host']}:{kwargs['port']}"
        return str(kwargs.get("path") or "primary")  # a unix socket; Sentinel's primary

    async def _infos(self) -> tuple[dict[str, dict[str, Any]], dict[str, Exception]]:
        """INFO (its default sections: memory, stats, server) of every primary; and the
        primaries whose INFO timed out or could not be sent, with why. Raises the
        ResponseError of a primary that refuses INFO."""
        out: dict[str, dict[str, Any]] = {}
        failed: dict[str, Exception] = {}
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()  # once (the first check may come first)
            nodes = self.client.get_primaries()
            replies = await asyncio.gather(
                *(self.client.execute_command("INFO", target_nodes=node) for node in nodes),
                return_exceptions=True,
            )
            for node, reply in zip(nodes, replies, strict=True):
                if isinstance(reply, ResponseError):
                    raise reply
                if isinstance(reply, (RedisError, OSError)):
                    failed[str(node.name)] = reply
                elif isinstance(reply, BaseException):
                    raise reply
                else:
                    # redis-py answers one node's INFO as {name: info} or as the info itself.
                    out[str(node.name)] = (
                        reply if "run_id" in reply else reply.get(node.name, reply)
                    )
            return out, failed
        name = self._standalone_name()
        try:
            out[name] = await self.client.info()
        except ResponseError:
            raise
        except (RedisError, OSError) as exc:
            failed[name] = exc
        return out, failed

    async def _read_eviction(self) -> set[str]:
        """Reads each primary's maxmemory, maxmemory_policy and evicted_keys; says an
        evicting policy (once per change) and returns the nodes whose evicted_keys rose
        since the last check. A Redis that refuses INFO is said once and not read."""
        if self._info_refused:
            return set()
        try:
            infos, failed = await self._infos()
        except ResponseError as exc:
            self._info_refused = True
            log.warning(
                "cannot read INFO from Redis (%s): keys it evicts at maxmemory will not be "
                "noticed; %s",
                exc,
                FIX,
            )
            return set()
        # A primary whose INFO timed out or dropped (slow, or out of reach while the others
        # answer): this check cannot tell whether it evicted; the markers and the stops go
        # on all the same (INFO is this watch's alone). Its count stays as last read, so
        # the next read that answers sees an eviction of meanwhile.
        if failed and not self._info_failing:
            log.warning(
                "cannot read INFO from Redis at %s (%s): its evictions are looked for at "
                "the next check that reads it",
                ", ".join(sorted(failed)),
                "; ".join(str(failed[n]) for n in sorted(failed)),
            )
        elif not failed and self._info_failing:
            log.warning("Redis INFO answers again: evictions are read at every check")
        self._info_failing = bool(failed)
        rose: set[str] = set()
        # A primary not read keeps what its last read showed.
        views: list[EvictionView] = [v for v in self.eviction if v.node in failed]
        for node, info in sorted(infos.items()):
            policy = str(info.get("maxmemory_policy", NO_EVICTION))
            maxmemory = int(info.get("maxmemory", 0) or 0)
            count = int(info.get("evicted_keys", 0) or 0)
            run_id = str(info.get("run_id", ""))
            before = self._evicted.get(node)
            # Another server (restarted, failed over) counts from its own start.
            if before is not None and before[0] == run_id and count > before[1]:
                rose.add(node)
            self._evicted[node] = (run_id, count)
            if evicts(policy, maxmemory):
                views.append(EvictionView(node, policy, maxmemory, count))
                if self._said.get(node) != (policy, maxmemory):
                    self._said[node] = (policy, maxmemory)
                    log.error(
                        "Redis at %s runs maxmemory-policy %s with maxmemory %d bytes: at "
                        "that limit it deletes keys (budget counters, holds, stops, rate-limit "
                        "windows, idempotency keys, loop guards, learned estimates), which "
                        "lets spend past the caps; %s. Evictions are reported as a state "
                        "loss (%d keys evicted so far).",
                        node, policy, maxmemory, FIX, count,
                        extra={"node": node, "maxmemory_policy": policy,
                               "maxmemory": maxmemory, "evicted_keys": count},
                    )  # fmt: skip
            elif node in self._said:
                del self._said[node]
                log.warning(
                    "Redis at %s no longer evicts (maxmemory-policy %s, maxmemory %d)",
                    node, policy, maxmemory,
                )  # fmt: skip
        self.eviction = sorted(views, key=lambda v: v.node)
        if self.on_evicting is not None:
            self.on_evicting(bool(views))
        return rose

    def _forget(self, ids: list[str], tenant: str) -> None:
        """Remember stop ids as lifted (the newest LIFTED_MAX per tenant)."""
        if ids:
            lifted = self._lifted.setdefault(tenant, [])
            lifted.extend(i for i in ids if i not in lifted)
            del lifted[:-LIFTED_MAX]

    async def _read_stops(self, tenants: list[str]) -> dict[str, list[Stop]]:
        """Every tenant's stops, STOP_READS tenants' reads in flight at once: a check over
        many tenants takes a few round trips, not one after the other per tenant, and
        opens no more than STOP_READS connections for it."""
        found = await _batched(tenants, lambda t: self.stops.list(t))
        return dict(zip(tenants, found, strict=True))

    def stop_changed(self, tenant: str, made: Stop | None, lifted: str | None) -> None:
        """A stop made or lifted through this sidecar (Stops.on_change): what a loss would
        put back follows at once, since a loss before the next check must neither bring
        back a stop lifted here on purpose nor lose one made here."""
        before = self._stops.get(tenant, [])
        # Lifted, or replaced by the one made: remembered, a rollback may bring it back.
        replaced = [
            s.id
            for s in before
            if made is not None and (s.scope, s.scope_id) == (made.scope, made.scope_id)
        ]
        self._forget([*replaced, *([lifted] if lifted is not None else [])], tenant)  # fmt: skip
        self._stops[tenant] = _changed(before, made, lifted)
        self._changes.append((tenant, made, lifted))

    async def _put_back(self, lost: set[str]) -> tuple[int, int]:
        """The stops of the tenants' slots that lost their state (or went back) as seen at
        the last check, STOP_READS tenants at once; (put back, lifted again). Not for the
        definitions' slot ("") alone: no stop lives there, and the tenants' slots kept
        theirs (on a Redis Cluster), so putting them back would only bring back a stop
        lifted on another replica since."""

        async def each(tenant: str) -> tuple[int, int]:
            restored = lifted = 0
            known_lifted = set(self._lifted.get(tenant, []))
            if known_lifted:
                # An older state brings back stops lifted since: lift those this sidecar
                # knows were lifted (ids are never reused, so none is a new stop), before
                # putting back the ones it saw, which may be of the same entities.
                for stop in await self.stops.list(tenant):
                    if stop.id in known_lifted and await self.stops.delete(tenant, stop.id):
                        lifted += 1
            for stop in self._stops.get(tenant, []):
                restored += await self.stops.restore(tenant, stop)
            return restored, lifted

        done = await _batched(sorted(t for t in lost if t), each)
        return sum(r for r, _ in done), sum(lifted for _, lifted in done)

    async def _lost(
        self, lost: set[str], now: int, kind: str, restored_stops: int, lifted_stops: int
    ) -> None:
        # "" is the definitions' own slot: losing it loses them for every tenant.
        tenants = sorted(t for t in lost if t) or self._tenants()
        restored_defs = await self.definitions.store.restore(None if "" in lost else set(tenants))
        await self.definitions.reload()  # (refresh would ask this check again: the lock)
        # Counted with `losses`, before the alerts' round trip: a Redis that fails that
        # write must not leave a loss noticed (and logged) but never counted, and whoever
        # sees `losses` sees the metric too.
        self.losses += 1
        if self.on_loss is not None:
            self.on_loss(kind)
        self.last_loss = LossView(
            at=iso(now),
            tenants=tenants,
            restored_stops=restored_stops,
            restored_definitions=restored_defs,
            count=self.losses,
            kind=kind,
            lifted_stops=lifted_stops,
        )
        self.engine.state_lost_at = iso(now)
        put_back = (
            f"this sidecar put back {restored_stops} stops and {restored_defs} admin API "
            "definitions"
        )
        if kind == EVICTED:
            message = (
                "Redis evicted keys at its maxmemory (maxmemory-policy "
                + ", ".join(sorted({f"{v.policy} on {v.node}" for v in self.eviction}) or {"?"})
                + "): any of the counters, holds, rate-limit windows, idempotency keys, "
                "stops, loop guards and learned estimates of these tenants may be gone, so "
                "spend before the eviction may not be counted against the caps; "
                + put_back + "; " + FIX
            )  # fmt: skip
            what = (
                "budget store evicted keys; %s (said once an hour while Redis goes on "
                'evicting; budget_sidecar_store_state_lost_total{kind="evicted"} counts '
                "every check that found an eviction)"
            )
        elif kind == ROLLED_BACK:
            message = (
                "Redis rolled back to an older state (restored from an older dump or "
                "backup, or failed over to a replica far behind): counters, holds, "
                "rate-limit windows, idempotency keys, the usage ledger, stops and admin "
                "API definitions went back to what they were when that dump was taken, so "
                "spend since then is not counted against the caps; " + put_back
                + f" and lifted again {lifted_stops} stops lifted since"
            )  # fmt: skip
            what = "budget store rolled back to an older state; %s"
        else:
            message = (
                "Redis lost its state (restarted empty, flushed, or failed over to an empty "
                "replica): counters, holds, rate-limit windows, idempotency keys and learned "
                "estimates restart from zero, so spend before the loss is not counted against "
                "the caps; " + put_back
            )
            what = "budget store lost its state; %s"
        window = now // EVICTION_ALERT_MS
        if kind == EVICTED:
            # Said before in this window (a Redis that keeps evicting): counted, not said.
            tenants_said = [t for t in tenants if self._evict_alerted.get(t) != window]
            for tenant in tenants_said:
                self._evict_alerted[tenant] = window
        else:
            tenants_said = tenants
        if tenants_said:
            log.error(
                what,
                message,
                extra={"tenants": tenants, "kind": kind, "restored_stops": restored_stops,
                       "restored_definitions": restored_defs, "lifted_stops": lifted_stops},
            )  # fmt: skip
        alerts: list[tuple[str, dict[str, str | int]]] = []
        for tenant in tenants_said:
            # g: the marker the lost slot holds now, the same on every replica that noticed
            # (the alert's id: sidecar.alerts); the definitions' when only theirs was lost.
            marker = keys.state_marker(tenant) if tenant in lost else keys.DEFS_EPOCH
            alert_id = self._epochs.get(marker, "")
            if kind == EVICTED:
                # The marker stays through an eviction: the window tells one apart from the
                # next, the same on every replica (their reads of evicted_keys differ).
                alert_id += f".ev{window}"
            alerts.append((keys.tenant_keys(tenant).alerts,
                           {"k": ALERT_KIND, "g": alert_id, "s": "",
                            "e": keys.escape(tenant), "r": message, "at": now}))  # fmt: skip
        # An eviction's id is shared by the replicas noticing within the window: written
        # only when the stream lacks it (another replica wrote it first).
        await self._send_alerts(alerts, again=kind == EVICTED, lookback=_EVICTION_LOOKBACK)

    async def _send_alerts(
        self,
        alerts: list[tuple[str, dict[str, str | int]]],
        *,
        again: bool,
        lookback: int = 0,
    ) -> None:
        """Write loss alerts in one round trip. A write that fails leaves them for the next
        check (the loss is counted and logged once all the same: the check does not find it
        again). Written again (`again`), an alert whose id (g) the stream's newest entries
        (`lookback`, default _RESEND_LOOKBACK) already hold is not added: the failed write may
        have been applied, its answer lost; or another replica wrote the same eviction's."""
        try:
            todo = alerts
            if again:
                pipe = self.client.pipeline(transaction=False)
                for stream, _ in alerts:
                    pipe.xrevrange(stream, count=lookback or _RESEND_LOOKBACK)
                newest = await pipe.execute()
                todo = [
                    (stream, entry)
                    for (stream, entry), seen in zip(alerts, newest, strict=True)
                    if not any(_same_alert(f, entry) for _, f in seen)
                ]
            pipe = self.client.pipeline(transaction=False)  # one round trip, not one a tenant
            for stream, entry in todo:
                pipe.xadd(stream, entry, maxlen=ALERTS_MAX, approximate=True)  # type: ignore[arg-type]
            if todo:
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Added to, not replaced: one check may say a loss and an eviction.
            self._unsent.extend(alerts)
            log.warning(
                "the alert of a state loss could not be written (%s); the next check writes it",
                exc,
                extra={"alerts": len(alerts)},
            )
            return

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


# How many of an alerts stream's newest entries a loss alert written again is looked for
# in (the check that failed was at most a few checks ago).
_RESEND_LOOKBACK = 1_000
# ... and an eviction alert in (another replica's of the same window is among the newest;
# one missed is a duplicate of the same id, which receivers deduplicate): a new window's
# alert reads this many entries of each tenant's stream, not a thousand.
_EVICTION_LOOKBACK = 32


def _same_alert(found: dict[Any, Any], entry: dict[str, str | int]) -> bool:
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    got = {text(k): text(v) for k, v in found.items()}
    return got.get("k") == ALERT_KIND and got.get("g") == str(entry["g"])


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
