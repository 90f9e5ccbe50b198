"""The background sweep: what a tenant wrote goes after its retention even when the tenant
goes idle (issue 16).

The scripts on the hot path collect as they go (ended leases, a few due finished
reservations per call), but only while the tenant sends traffic, and counters and rate
limiter fields have no index any more (an index per counter cost more than the counters
themselves). So every replica runs this loop: one sweep.lua call per tenant per interval,
each bounded (ended leases, due finished reservations, one HSCAN step over the counters
hash; see lua/sweep.lua). Replicas share the walk's cursor in Redis, so two replicas
sweeping the same tenant only finish the walk sooner. A walk over a tenant with F counter
fields takes F / FIELDS_PER_CALL intervals (600,000 fields: 10 minutes at the defaults).

When a counter may go: its window has ended in every time zone its budget could use, and
no settle can still charge it: a reservation made in the window holds at most
max_lease_ms, is reclaimed within a sweep interval of its lease end, and is remembered
keep_finished_ms after that, during which a late settle is still charged. A counter that a
settle recreates after all (Redis was away longer than that) is found again by the next
walk: nothing leaks.

A tenant that leaves the config (its clients removed, or open mode's "default" given
credentials instead) sends nothing more and is no longer among the engine's tenants, but
what it wrote must go all the same. So every ORPHAN_EVERY rounds the sweep also takes one
step of a SCAN over the keyspace (read only: ORPHAN_SCAN keys), and a tenant found with
counters, leases, reservations or a gc index that is not configured is swept after the
configured ones until none of those is left.

The usage ledger and the alerts streams are bounded by count, and by age too: the sweep
trims their entries past usage_max_age_days and alerts_max_age_days, and a stream no
webhook reads expires once its newest entry is that old, so a tenant gone idle or out of
the config leaves none behind. A webhook's alerts are trimmed, never expired whole (that
would delete its group): what it had not read counts as dropped, as the stream's cap
does. A tenant out of the config, whose groups nobody reads, loses them with the stream
once every alert is past its age, and what they had not read is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import RedisError

from sidecar import keys, tasks
from sidecar.engine import Engine
from sidecar.model import Period
from sidecar.periods import window
from sidecar.store import Store, StoreError

log = logging.getLogger("budget_sidecar.sweep")

INTERVAL_S = 1.0
FIELDS_PER_CALL = 1000  # one HSCAN step: about a millisecond of Redis time
LEASES_PER_CALL = 100
MEMBERS_PER_CALL = 200
ORPHAN_SCAN = 1000  # keys looked at per search step for unconfigured tenants
# One search step every this many rounds (the first round included): every replica runs
# it, so a fleet of 100 costs Redis 10 SCAN steps a second, not 100, and what a gone
# tenant left is found within ORPHAN_EVERY * keys / ORPHAN_SCAN seconds (1M keys: ~3 h).
ORPHAN_EVERY = 10
# Slack past the longest a late settle can charge a counter (a reclaim delayed by a busy
# Redis, clocks of replicas a little apart).
SLACK_MS = 3_600_000
# A window key names the local start date; in the zone furthest west (UTC-12) that day
# ends 12 h after it ends in UTC. Budgets in UTC only need no such margin.
ZONE_MARGIN_MS = 14 * 3_600_000
_LETTERS = (Period.DAILY, Period.WEEKLY, Period.MONTHLY, Period.QUARTERLY, Period.YEARLY)
_UTC = ZoneInfo("UTC")


@dataclass(frozen=True, slots=True)
class Step:
    """What one sweep.lua call reported."""

    walked: bool  # this call finished a walk over the whole counters hash
    leases_left: bool  # ended leases still wait (the next call returns more)
    deleted: int  # counter and limiter fields deleted
    # finished reservations past their retention still waiting (+1 while ledger records
    # or alerts past their age may)
    due_left: int
    # alerts no webhook had read, gone with the stream of a tenant out of the config
    alerts_dropped: int = 0


def cutoffs(now_ms: int, grace_ms: int) -> list[str]:
    """Per period letter (d, w, m, q, y): the start date (yyyymmdd) of the oldest window
    whose counters stay. Counters of a window that starts earlier ended (in UTC) before
    the window containing now - grace began."""
    at = now_ms - grace_ms
    return [window(p, at, _UTC).key[1:] for p in _LETTERS]


class Sweeper:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        interval_s: float = INTERVAL_S,
        fields_per_call: int = FIELDS_PER_CALL,
        leases_per_call: int = LEASES_PER_CALL,
        members_per_call: int = MEMBERS_PER_CALL,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self.interval_s = interval_s
        self._fields = fields_per_call
        self._leases = leases_per_call
        self._members = members_per_call
        self._on_dropped = on_dropped
        # Alerts of tenants out of the config that went unread (for tests and logs).
        self.alerts_dropped = 0
        self._failing = False
        # For tests and logs: sweep.lua calls made, and whether the last one found its
        # tenant with nothing left to do.
        self.calls = 0
        self.last_error: Exception | None = None
        self.idle = False
        self._orphans: set[str] = set()  # tenants found with keys, no longer configured
        self._scan: AsyncIterator[Any] | None = None  # the SCAN that finds them, mid-way
        self._rounds = 0

    def grace_ms(self, tenant: str) -> int:
        """How long after its window's end (in UTC) a counter of `tenant` stays."""
        s = self._engine.config.settings
        grace = s.max_lease_ms + int(self.interval_s * 1000) + s.keep_finished_ms + SLACK_MS
        if any(b.timezone != "UTC" for b in self._engine.budgets(tenant)):
            grace += ZONE_MARGIN_MS
        return grace

    def _ledger_age_ms(self) -> int:
        """sweep.lua's ARGV[12]: the ledger's age bound, applied with no traffic too (also
        with usage_max_records 0: records kept before that still age out)."""
        return self._engine.config.settings.usage_max_age_days * 86_400_000

    def _alerts_age_ms(self) -> int:
        """sweep.lua's ARGV[13]: the alerts' age bound."""
        return self._engine.config.settings.alerts_max_age_days * 86_400_000

    async def sweep_once(self, tenant: str, *, report: bool = True, orphan: bool = False) -> Step:
        """One bounded sweep.lua call for `tenant` (`report`: it counts in calls and idle,
        which say how the configured tenants' sweep goes; `orphan`: the tenant is no longer
        configured, and no webhook reads its alerts)."""
        engine = self._engine
        now = engine.now_ms()
        day = time.strftime("%Y%m%d", time.gmtime(now // 1000))
        args: Sequence[str | int] = (
            now,
            engine.config.settings.keep_finished_ms,
            engine.limiter_ms(),
            self._fields,
            self._leases,
            self._members,
            *cutoffs(now, self.grace_ms(tenant)),
            self._ledger_age_ms(),
            self._alerts_age_ms(),
            "1" if orphan else "",
        )
        reply: list[Any] = await self._store.run(
            engine.scripts.sweep, keys.tenant_keys(tenant).sweeping(day), args
        )
        engine.report_expired(reply)
        step = Step(
            walked=int(reply[0]) == 1,
            leases_left=int(reply[1]) == 1,
            deleted=int(reply[2]),
            due_left=int(reply[3]),
            alerts_dropped=int(reply[4]),
        )
        if step.alerts_dropped:
            self.alerts_dropped += step.alerts_dropped
            if self._on_dropped is not None:
                self._on_dropped(step.alerts_dropped)
            log.warning(
                "%d alerts of tenant %s, which is no longer configured, went past "
                "alerts_max_age_days before any webhook delivered them: they are lost",
                step.alerts_dropped,
                tenant,
                extra={"tenant": tenant, "dropped": step.alerts_dropped},
            )
        if report:
            self.calls += 1
            self.idle = step.walked and not step.leases_left and step.due_left == 0
        return step

    async def sweep_until_done(self, tenant: str, max_calls: int = 1_000_000) -> int:
        """Sweep `tenant` until a whole walk is done and nothing due is left: what the loop
        does over time, at once (tests, bench.memory). Returns the calls it took."""
        walked = False
        for calls in range(1, max_calls + 1):
            step = await self.sweep_once(tenant)
            walked = walked or step.walked
            if walked and not step.leases_left and step.due_left == 0:
                return calls
        raise RuntimeError(f"sweep of {tenant!r} not done after {max_calls} calls")

    @property
    def orphans(self) -> frozenset[str]:
        """The unconfigured tenants being swept now (for tests and logs)."""
        return frozenset(self._orphans)

    async def find_orphans(self, configured: set[str]) -> None:
        """One step (ORPHAN_SCAN keys) of the SCAN for tenants that are not configured
        but hold keys only the sweep collects; a finished SCAN starts again next round."""
        # Taken out while in use: a round run meanwhile (a test's, beside the loop's)
        # starts a SCAN of its own instead of stepping a generator already running.
        scan, self._scan = self._scan, None
        if scan is None:
            scan = self._store.client.scan_iter(match=keys.TENANT_KEYS_MATCH, count=ORPHAN_SCAN)
        for _ in range(ORPHAN_SCAN):
            try:
                key = await anext(scan)
            except StopAsyncIteration:
                scan = None
                break
            tenant = keys.collected_tenant(key if isinstance(key, str) else key.decode())
            if tenant is not None and tenant not in configured:
                self._orphans.add(tenant)
        self._scan = scan
        self._orphans -= configured

    async def _sweep_orphan(self, tenant: str) -> None:
        """One call for a tenant no longer configured; it is forgotten once nothing the
        sweep collects is left of it, its streams gone or expiring by themselves (the SCAN
        finds it again if it writes anew)."""
        step = await self.sweep_once(tenant, report=False, orphan=True)
        if step.walked and not step.leases_left and step.due_left == 0:
            t = keys.tenant_keys(tenant)
            client = self._store.client
            # pttl -1: a key that lasts for ever (-2: none, else expiring).
            lasting = [await client.pttl(stream) == -1 for stream in (t.usage, t.alerts)]
            if await client.exists(t.counters, t.leases, t.reservations, t.gc) == 0 and not any(
                lasting
            ):
                self._orphans.discard(tenant)

    async def sweep_round(self) -> None:
        """One call per tenant. Redis away: this round is skipped, the next one tries."""
        configured = self._engine.tenants()
        searching = self._rounds % ORPHAN_EVERY == 0
        self._rounds += 1
        try:
            if searching:
                await self.find_orphans(configured)
        except (StoreError, RedisError, OSError) as exc:
            self._scan = None  # the configured tenants are swept all the same
            self.last_error = exc
        for tenant in [*sorted(configured), *sorted(self._orphans)]:
            try:
                if tenant in configured:
                    await self.sweep_once(tenant)
                else:
                    await self._sweep_orphan(tenant)
            except (StoreError, RedisError, OSError) as exc:
                self.last_error = exc
                if not self._failing:  # once per outage, not once a second
                    log.warning("sweep paused, redis unavailable: %s", exc)
                self._failing = True
                return
        if self._failing:
            log.info("sweep resumed")
        self._failing = False

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_round()
            except Exception as exc:  # a bug must not end collection for the process's life
                self.last_error = exc
                log.exception("sweep round failed")
            await asyncio.sleep(self.interval_s)

    async def lifecycle(self) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self.run())
        yield
        await tasks.stop([task], what="sweep")
