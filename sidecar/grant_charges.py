"""What a fail-open grant's settle, release or lease end charges, as record.lua's call.

sidecar.fail_open keeps the grants and queues their charges; this module gives a degraded
authorize its grant id, prices a grant's settle the way settle.lua prices a reservation
(Settlement.mode), and builds the record.lua call that charges it, as /v1/record's is
built, with the grant's id as the idempotency key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msgspec.structs import replace as with_fields

from sidecar import estimates, fail_open, rendering
from sidecar.estimates import CHARGE_ESTIMATE, Settlement
from sidecar.model import Config, Price
from sidecar.money import micro_to_usd
from sidecar.reservations import fingerprint, meta, meta_head, new_attempt_id
from sidecar.resolution import record_slot
from sidecar.schemas import AuthorizeRequest, Decision, SettleResult

if TYPE_CHECKING:
    from sidecar.engine import Engine

_GRANTED = (
    "redis unavailable; allowed by fail mode open without a hold: settle or release "
    "reservation_id as usual, it is charged once Redis answers"
)


class GrantCharges:
    """The engine's fail-open grants: `book` keeps them (sidecar.fail_open), this prices
    and builds their charges."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self._engine = engine
        self.book = fail_open.FailOpenBook(
            engine.clock, engine.events, self._record, self._charge_estimate
        )
        self.bound(config)

    def bound(self, config: Config) -> None:
        self.book.cap = config.settings.fail_open_max_pending
        # A queued charge waits as long as a finished reservation is remembered.
        self.book.max_age_ms = config.settings.keep_finished_ms

    def grant(
        self,
        degraded: Decision,
        tenant: str,
        req: AuthorizeRequest,
        price: Price | None,
        asked_micro: int,
        est_micro: int,
        lease_end_ms: int,
    ) -> Decision:
        """Give an authorize allowed by fail mode open a grant id (none when the book is
        full): nothing is held, but the settle of that id is charged when Redis answers. A
        retry with the same idempotency key gets the same id (fail_open.grant_id)."""
        key = req.idempotency_key
        grant = fail_open.Grant(
            tenant, req, price, est_micro, lease_end_ms, req.on_expiry == "charge"
        )
        bound_to = fingerprint(req, asked_micro) if key else ""
        granted, again = self.book.add(fail_open.grant_id(tenant, key, bound_to), grant)
        if granted is not None:
            degraded.reservation_id, degraded.replayed = granted, again
            degraded.message = _GRANTED
        return degraded

    async def settle(self, tenant: str, rid: str, settled: Settlement) -> SettleResult | None:
        """The settle of a fail-open grant, charged as a record (None: not one of this
        process's grants; Redis is asked as for any reservation)."""
        grant = self._open(tenant, rid)
        if not isinstance(grant, fail_open.Grant):
            return grant  # a repeat's answer, or not a grant of this process
        # The same pricing as settle.lua's modes (Settlement.mode).
        cost_micro, tokens = settled.cost_micro, settled.tokens
        if cost_micro == CHARGE_ESTIMATE:
            cost, priced_by = grant.estimate_micro, "estimate"
        elif cost_micro is not None:
            cost, priced_by = cost_micro, "tokens" if settled.priced_here else "cost"
        elif grant.price is not None and tokens is not None:
            cost, priced_by = estimates.estimate(grant.price, None, *tokens), "tokens"
        else:
            cost, priced_by = grant.estimate_micro, "estimate"
        charge = self._charge(rid, grant, cost, priced_by, settled)
        return await self.book.settle(rid, grant, charge)

    def release(self, tenant: str, rid: str) -> SettleResult | None:
        """The release of a fail-open grant: nothing to charge (None: not one of this
        process's grants)."""
        grant = self._open(tenant, rid)
        if not isinstance(grant, fail_open.Grant):
            return grant  # a repeat's answer, or not a grant of this process
        answer = SettleResult(
            reservation_id=rid,
            state="released",
            cost_usd=0.0,
            estimated_usd=micro_to_usd(grant.estimate_micro),
            overshoot_usd=0.0,
            estimate_error_usd=0.0,
            priced_by="none",
            lease_expired=self._engine.now_ms() >= grant.lease_end_ms,
            replayed=False,
            provider=grant.req.provider,
            model=grant.req.model,
            tokens_in=0,
            tokens_out=0,
            budgets=[],
        )
        self.book.release(rid, answer)
        return answer

    def _open(self, tenant: str, rid: str) -> fail_open.Grant | SettleResult | None:
        """The open grant `rid`; or the first answer again (replayed) when it was settled
        or released before (a settled one's charge stands, queued or recorded); or None:
        not one of this process's grants."""
        done = self.book.answered(tenant, rid)
        if done is not None:
            return with_fields(done, replayed=True)
        grant = self.book.grant(tenant, rid)
        if grant is not None and grant.charge is not None:
            return with_fields(grant.charge.answer, replayed=True)
        return grant

    def _charge(
        self, rid: str, grant: fail_open.Grant, cost: int, priced_by: str, settled: Settlement
    ) -> fail_open.Charge:
        """record.lua's call for a grant's charge, as the engine's record builds it, with
        the grant's id as idempotency key; built now, so the charge lands in the period of
        its settle."""
        engine = self._engine
        settings = engine.config.settings
        now = engine.now_ms()
        req = grant.req
        resolved = engine.resolve(grant.tenant, req, req.provider, req.model, now)
        provider, model = settled.provider_model or (req.provider, req.model)
        head = (
            resolved.meta_head
            if settled.provider_model is None
            else meta_head(provider, model, engine.identity(req))
        )
        tokens_in, tokens_out = settled.tokens or (0, 0)
        args: list[str | int] = [
            now,
            cost,
            rid,
            settings.keep_finished_ms,
            meta(head, req.step_id, req.run_id),
            tokens_in,
            tokens_out,
            engine.ledger,
            "" if settled.latency_ms is None else settled.latency_ms,
            "1" if settled.success else "0",
            # One attempt per charge, the same on every re-send: a re-send of one whose
            # answer was lost answers 4 (lua/record.lua), and is counted then.
            new_attempt_id(),
        ]
        for a in resolved.budgets:
            args += (a.cid, record_slot(a), a.budget.limit_micro, a.thresholds)
        answer = SettleResult(
            reservation_id=rid,
            state="queued",
            cost_usd=micro_to_usd(cost),
            estimated_usd=micro_to_usd(grant.estimate_micro),
            overshoot_usd=0.0,
            estimate_error_usd=micro_to_usd(max(0, cost - grant.estimate_micro)),
            priced_by=priced_by,
            lease_expired=now >= grant.lease_end_ms,
            replayed=False,
            provider=provider,
            model=model,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            budgets=[],
        )
        return fail_open.Charge(
            grant.tenant,
            engine.charging_keys(grant.tenant, now),
            tuple(args),
            tuple(resolved.budgets),
            answer,
            now,
        )

    def _charge_estimate(self, rid: str, grant: fail_open.Grant) -> fail_open.Charge:
        """A grant with on_expiry charge whose lease ended unsettled: its estimate."""
        at_estimate = Settlement(grant.estimate_micro, None, None, True)
        return self._charge(rid, grant, grant.estimate_micro, "estimate", at_estimate)

    async def _record(self, charge: fail_open.Charge) -> SettleResult:
        """Run a grant's charge (StoreUnavailable while Redis is away). A charge Redis saw
        before (a retry, another replica) answers replayed and charges nothing."""
        engine = self._engine
        reply: list[Any] = await engine.run_script(
            engine.scripts.record, charge.tenant, charge.args, charge.script_keys
        )
        values = [int(v) for v in reply[1:]]
        return with_fields(
            charge.answer,
            state="settled",
            # 4: this charge's own earlier send ran, its answer was lost: counted now.
            replayed=int(reply[0]) == 2,
            budgets=[
                rendering.budget_state(a, values[2 * i], values[2 * i + 1])
                for i, a in enumerate(charge.applied)
            ],
        )
