"""The stop switch: an operator's stop denies every decision for one entity (and what lies
below it) on every replica from the next call on (DESIGN.md, glossary "stop").

A stop is recorded in the tenant's stops hash (keys.TenantKeys.stops) and mirrored into
its counters hash (format in sidecar.keys and lua/stops.lua), which authorize.lua and
check.lua read inside the decision itself: no poll interval, no cache to go stale. This
module makes, reads, lifts and lists stops through lua/stops.lua, one atomic script per
operation, off the hot path. Making one also appends
a guard alert (`k` = stop) to the tenant's alerts stream, delivered like every alert.

One stop per entity: a new stop of an entity replaces the one in force. A stop with a ttl
ends by itself: decisions ignore it from its `expires_at` on, and the lists that meet it
collect it.

A stop's times (made, expires) are on the stops' clock: Redis TIME, the one clock every
replica shares, as the rate limiters' (sidecar.clock limiter_ms; a test's FakeClock passes
its own). The script sets them and every decision compares with the same clock: a replica
whose own clock is off by the ttl or more still ends the stop when every other does.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sidecar import keys
from sidecar.model import Scope
from sidecar.periods import iso
from sidecar.scripts import Script
from sidecar.store import Store

log = logging.getLogger("sidecar.stops")

ID_PREFIX = "stop_"
MAX_REASON = 500
MAX_TTL_S = 30 * 86_400


@dataclass(frozen=True, slots=True)
class Stop:
    id: str
    scope: str
    scope_id: str
    reason: str
    created_ms: int
    expires_ms: int  # 0: until lifted

    @property
    def created_at(self) -> str:
        return iso(self.created_ms)

    @property
    def expires_at(self) -> str | None:
        return iso(self.expires_ms) if self.expires_ms else None


def new_id() -> str:
    """64 random bits: unguessable enough that a stop id names one stop of one tenant."""
    return ID_PREFIX + secrets.token_hex(8)


def parse(field: str, value: str) -> Stop | None:
    """The Stop of one hash entry (None: not one this version can read)."""
    scope, entity = keys.parse_stop_field(field)
    parts = value.split("|", 3)
    if len(parts) != 4:
        return None
    stop_id, expires, created, reason = parts
    try:
        return Stop(stop_id, scope, entity, reason, int(created), int(expires))
    except ValueError:
        return None


class StopsFull(Exception):
    """The tenant has the most stops in force settings.max_stops allows, and the entity
    has none of its own to replace: nothing was written."""


# (tenant, the stop made or None, the id of the stop lifted or None).
StopChange = Callable[[str, Stop | None, str | None], None]


class Stops:
    """Stops of every tenant over one store."""

    def __init__(self, store: Store, script: Script, clock: Callable[[], str]) -> None:
        self._store = store
        self._script = script
        # The stops' clock, as a script argument (Clock.limiter_ms: '' = Redis TIME).
        self._clock = clock
        # Told of each stop made or lifted through this replica: sidecar.state_loss keeps
        # what it would put back after a loss in step at once, not at its next check.
        self.on_change: StopChange | None = None

    async def _run(self, tenant: str, op: str, *args: str | int) -> list[str]:
        tk = keys.tenant_keys(tenant)
        argv = (op, self._clock(), *args)
        reply = await self._store.run(self._script, (tk.stops, tk.alerts, tk.counters), argv)
        return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]

    async def create(
        self,
        tenant: str,
        scope: Scope,
        scope_id: str,
        reason: str,
        ttl_s: int | None,
        most: int = 1_000,  # settings.max_stops (its default)
    ) -> tuple[Stop, str | None]:
        """Make a stop (replacing the entity's stop in force); (the stop, the replaced
        stop's id or None). Raises StopsFull when the tenant has `most` stops in force and
        the entity none (a new stop of a stopped entity replaces it, at the cap too). Its
        times are the script's, on the stops' clock (the module's docstring)."""
        stop_id = new_id()
        field = keys.stop_field(scope.value, scope_id)
        reply = await self._run(
            tenant, "create", field, stop_id, ttl_s * 1000 if ttl_s else 0, reason,
            scope.value, keys.escape(scope_id), most,
        )  # fmt: skip
        if reply[0] == "-1":
            raise StopsFull(f"the tenant has {most} stops in force")
        replaced = reply[1] or None
        stop = Stop(
            id=stop_id,
            scope=scope.value,
            scope_id=scope_id,
            reason=reason,
            created_ms=int(reply[2]),
            expires_ms=int(reply[3]),
        )
        if self.on_change is not None:
            self.on_change(tenant, stop, None)
        log.info(
            "stop made",
            extra={"tenant": tenant, "stop_id": stop.id, "scope": stop.scope,
                   "entity": scope_id, "replaced": replaced, "expires_at": stop.expires_at},
        )  # fmt: skip
        return stop, replaced

    async def get(self, tenant: str, stop_id: str) -> Stop | None:
        reply = await self._run(tenant, "get", stop_id)
        return parse(reply[0], reply[1]) if reply else None

    async def delete(self, tenant: str, stop_id: str) -> bool:
        """Lift a stop; False when there was none in force with this id."""
        lifted = (await self._run(tenant, "delete", stop_id))[0] == "1"
        if lifted:
            log.info("stop lifted", extra={"tenant": tenant, "stop_id": stop_id})
            if self.on_change is not None:
                self.on_change(tenant, None, stop_id)
        return lifted

    async def restore(self, tenant: str, stop: Stop) -> bool:
        """Put back a stop seen in force before Redis lost its state, as it was; False
        when the entity has a stop again (made since: it stands) or this one has ended.
        An entity whose record stayed but whose mirror in the counters hash went (an
        eviction of that hash alone) gets the mirror back from the record: True."""
        field = keys.stop_field(stop.scope, stop.scope_id)
        value = f"{stop.id}|{stop.expires_ms}|{stop.created_ms}|{stop.reason}"
        return (await self._run(tenant, "restore", field, value))[0] == "1"

    async def list(self, tenant: str) -> list[Stop]:
        """Every stop in force, oldest first (then by scope and entity)."""
        reply = await self._run(tenant, "list")
        found = [parse(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]
        return sorted(
            (s for s in found if s is not None), key=lambda s: (s.created_ms, s.scope, s.scope_id)
        )
