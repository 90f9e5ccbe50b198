"""Fail-open grants: the spend of a decision allowed by fail mode open is charged later.

When Redis does not answer an authorize in time and the fail mode is open, the call is
allowed with nothing held (invariant 8). The LLM call still happens and costs money, so
the decision gets a reservation id of its own form (MARK, then hex), and this book
remembers, in memory, who asked and what applies. Its settle (or the gateway's audit) is
charged as a `/v1/record` would be (lua/record.lua), with the grant's id as the
idempotency key: at once if Redis answers, else kept in a bounded queue that a background
task records when Redis is back. A retry, a second settle of the same id, or a second
replica recording the same grant (an authorize retried with the same idempotency key gets
the same id on every replica) charges nothing twice: record.lua remembers the key.

Bounded: at most `cap` grants and queued charges at once (settings.fail_open_max_pending);
a grant not settled by the end of its lease, and a queued charge older than
settings.keep_finished_ms, are let go. Everything let go is counted (events
fail_open_dropped) and logged, throttled (sidecar.log_throttle). A process that ends with
charges still queued loses them (README says so): they live in this process only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar import tasks
from sidecar.clock import Clock
from sidecar.events import EngineEvents
from sidecar.model import Price
from sidecar.reservations import SEP, new_reservation_id
from sidecar.schemas import AuthorizeRequest, SettleResult
from sidecar.store import StoreUnavailable

log = logging.getLogger("sidecar.fail_open")

# A fail-open grant's reservation id starts with this (the rest is hex, 32 in all, so it
# passes every reservation_id check). A random id of Redis's with the same start (1 in
# 65,536) is only looked up here, misses, and goes on to Redis as usual.
MARK = "fa11"
# The drain's waits between rounds while Redis stays away (doubling up to the last).
FIRST_RETRY_S = 0.05
LAST_RETRY_S = 1.0
# While only unsettled grants wait (nothing to record), how often their leases are looked at.
IDLE_S = 1.0

# Why something was let go (the label of budget_sidecar_fail_open_dropped_total).
FULL = "full"  # the book was at its cap: the decision was allowed without an id
LEASE_ENDED = "lease_ended"  # never settled nor released within its lease
EXPIRED = "expired"  # a queued charge Redis did not take within the age limit


def is_grant_id(rid: str) -> bool:
    return rid.startswith(MARK)


def grant_id(tenant: str, key: str | None, bound_to: str) -> str:
    """A new grant's id. With an idempotency key it is derived from the tenant, the key and
    the request's fingerprint, so a retry (on this replica or another) gets the same id and
    both charges of it count once."""
    if key is None:
        return MARK + new_reservation_id()[len(MARK) :]
    text = SEP.join((tenant, key, bound_to)).encode("utf-8", "surrogatepass")
    return MARK + hashlib.blake2b(text, digest_size=14).hexdigest()


@dataclass(frozen=True, slots=True)
class Charge:
    """One record.lua call, built when the settle came (its `now` is the settle's time, so
    the spend lands in the period it was made in), and the settle answer it stands for."""

    tenant: str
    script_keys: tuple[str, ...]
    args: tuple[str | int, ...]
    applied: tuple[Any, ...]  # the Applied budgets, in args order
    answer: SettleResult  # state "queued": what the settle answered while Redis was away
    made_ms: int


@dataclass(slots=True)
class Grant:
    tenant: str
    req: AuthorizeRequest  # the identity, provider, model, step and run of the call
    price: Price | None  # the call's price at authorize: a settle by tokens uses it
    estimate_micro: int
    lease_end_ms: int
    charge_at_lease_end: bool  # on_expiry charge: the estimate is charged at lease end
    charge: Charge | None = None  # set by the settle: waiting for Redis
    # Set while a charge of this grant is being sent (by a settle or the drain).
    sending: bool = field(default=False)


Recorder = Callable[[Charge], Awaitable[SettleResult]]
Expirer = Callable[[str, Grant], Charge]


class FailOpenBook:
    """The grants of this process and their queued charges. `record` runs a charge's
    record.lua (raising StoreUnavailable while Redis is away); `charge_estimate` builds
    the charge of a grant's estimate (on_expiry charge at lease end)."""

    def __init__(
        self,
        clock: Clock,
        events: EngineEvents,
        record: Recorder,
        charge_estimate: Expirer,
    ) -> None:
        self._clock = clock
        self._events = events
        self._record = record
        self._charge_estimate = charge_estimate
        self.cap = 10_000
        self.max_age_ms = 3_600_000
        # Grants waiting for a settle, and settled grants whose charge waits for Redis.
        self._live: dict[str, Grant] = {}
        # The first answer of each finished grant (recorded or released), so a repeated
        # settle or release returns it; the oldest go first beyond `cap`.
        self._done: dict[str, tuple[str, SettleResult]] = {}
        self._drain: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._live)

    @property
    def queued(self) -> int:
        return sum(1 for g in self._live.values() if g.charge is not None)

    # ---- grants ----------------------------------------------------------------------

    def add(self, rid: str, grant: Grant) -> tuple[str | None, bool]:
        """Remember a grant: (its id, whether it was made before: a retry's), or (None,
        False) when the book is full (dropped, counted and logged)."""
        known = self._live.get(rid)
        if known is not None and known.tenant == grant.tenant:
            return rid, True
        done = self._done.get(rid)
        if done is not None and done[0] == grant.tenant:
            return rid, True
        if len(self._live) >= self.cap:
            self._dropped(FULL, rid, grant.tenant)
            return None, False
        self._live[rid] = grant
        self._start()
        return rid, False

    def grant(self, tenant: str, rid: str) -> Grant | None:
        found = self._live.get(rid)
        return found if found is not None and found.tenant == tenant else None

    def answered(self, tenant: str, rid: str) -> SettleResult | None:
        """The first answer of a finished grant (None: not one of this tenant's)."""
        done = self._done.get(rid)
        return done[1] if done is not None and done[0] == tenant else None

    def release(self, rid: str, answer: SettleResult) -> None:
        """An open grant's release: nothing to charge, forget it (the answer is kept for
        a repeated release)."""
        grant = self._live.pop(rid, None)
        if grant is not None:
            self._finish(rid, grant.tenant, answer)

    def forget(self, tenant: str, rid: str) -> None:
        """A grant whose decision never reached its caller (the connection was gone)."""
        grant = self._live.get(rid)
        if grant is not None and grant.tenant == tenant and grant.charge is None:
            del self._live[rid]

    # ---- charges ---------------------------------------------------------------------

    async def settle(self, rid: str, grant: Grant, charge: Charge) -> SettleResult:
        """Charge a grant's settle now if Redis answers, else queue it (the answer then says
        state "queued"). The charge is queued before it is sent: a settle cancelled while
        Redis runs it leaves it queued, and the key makes the retry charge nothing."""
        grant.charge = charge
        grant.sending = True
        try:
            result = await self._record(charge)
        except StoreUnavailable:
            self._events.fail_open_charge("queued", None)
            self._start()
            return charge.answer
        finally:
            grant.sending = False
        self._recorded(rid, grant, result)
        self._events.fail_open_charge("recorded", None)
        return result

    def _recorded(self, rid: str, grant: Grant, result: SettleResult) -> None:
        if self._live.get(rid) is grant:
            del self._live[rid]
        self._finish(rid, grant.tenant, result)

    def _finish(self, rid: str, tenant: str, answer: SettleResult) -> None:
        self._done.pop(rid, None)
        while len(self._done) >= max(self.cap, 1):
            del self._done[next(iter(self._done))]  # the oldest answer: only a replay memo
        self._done[rid] = (tenant, answer)

    # ---- the drain -------------------------------------------------------------------

    def _start(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Until nothing is left: record the queued charges in the order they came, let go
        of what outlived its age limit, and wait (longer while Redis stays away)."""
        delay_s = FIRST_RETRY_S
        while self._live:
            self._expire()
            ok = await self._send_queued()
            if not self._live:
                return
            if ok:
                delay_s = FIRST_RETRY_S
                wait = IDLE_S if self.queued == 0 else FIRST_RETRY_S
            else:
                wait, delay_s = delay_s, min(delay_s * 2, LAST_RETRY_S)
            await asyncio.sleep(wait)

    async def _send_queued(self) -> bool:
        """Record every queued charge; False at the first Redis did not take."""
        for rid, grant in list(self._live.items()):
            charge = grant.charge
            if charge is None or grant.sending or self._live.get(rid) is not grant:
                continue
            grant.sending = True
            try:
                result = await self._record(charge)
            except StoreUnavailable:
                return False
            except Exception:
                # A script error: it would fail the same way again. Let it go, loudly.
                log.exception("fail-open charge of %s could not be recorded", rid)
                self._live.pop(rid, None)
                self._events.fail_open_dropped(EXPIRED)
                continue
            finally:
                grant.sending = False
            self._recorded(rid, grant, result)
            self._events.fail_open_charge("recorded_later", result)
        return True

    def _expire(self) -> None:
        now = self._clock.now_ms()
        for rid, grant in list(self._live.items()):
            charge = grant.charge
            if charge is None and now >= grant.lease_end_ms and not grant.sending:
                if grant.charge_at_lease_end:
                    # As a reservation with on_expiry charge: the estimate is charged.
                    grant.charge = self._charge_estimate(rid, grant)
                    self._events.fail_open_charge("queued", None)
                    continue
                del self._live[rid]
                self._dropped(LEASE_ENDED, rid, grant.tenant)
            elif charge is not None and now - charge.made_ms >= self.max_age_ms:
                if grant.sending:
                    continue
                del self._live[rid]
                self._dropped(EXPIRED, rid, grant.tenant)

    def _dropped(self, reason: str, rid: str, tenant: str) -> None:
        self._events.fail_open_dropped(reason)
        # One template per reason: the throttle keeps an outage to a line per interval.
        if reason == FULL:
            log.warning(
                "fail-open grant not remembered: %d pending already (settings."
                "fail_open_max_pending); its spend will not be charged",
                self.cap,
                extra={"tenant": tenant, "reason": reason},
            )
        elif reason == LEASE_ENDED:
            log.warning(
                "fail-open grant %s ended its lease unsettled; nothing charged for it",
                rid,
                extra={"tenant": tenant, "reason": reason},
            )
        else:
            log.warning(
                "fail-open charge %s dropped: redis did not take it within %d ms",
                rid,
                self.max_age_ms,
                extra={"tenant": tenant, "reason": reason},
            )

    async def close(self) -> None:
        """Stop the drain (what is still queued is lost with this process)."""
        left = self.queued
        if left:
            log.error("%d fail-open charges still queued are lost with this process", left)
        if self._drain is not None:
            await tasks.stop([self._drain], what="fail-open drain")
