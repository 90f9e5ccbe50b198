"""What the engine tells observers (metrics, logs) after each operation.

The engine calls these synchronously on the hot path: implementations must be cheap and
must not raise. The default does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sidecar.schemas import Decision, RecordResult, SettleResult


class EngineEvents(Protocol):
    def decided(self, operation: str, decision: Decision, seconds: float) -> None:
        """authorize or check answered (allowed, denied or degraded); `seconds` is the
        engine's wall time for it, Redis included."""

    def finished(self, operation: str, result: SettleResult, seconds: float) -> None:
        """settle or release answered (replays included: see result.replayed)."""

    def recorded(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
        seconds: float,
    ) -> None:
        """/v1/record charged (or replayed) a cost after the fact."""

    def late_charge(self, result: SettleResult) -> None:
        """A settle's charge whose answer no caller received (Redis ran it, its answer came
        after the timeout: the caller was told 503), found by a later settle of the same
        reservation (answered replayed) or in the background by the sidecar that timed
        out: reported once, here; `finished` skipped it (a replay, or no answer)."""

    def late_record(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        """A /v1/record charge whose answer no caller received (Redis ran it, its answer
        came after the timeout), found by a later record with the same idempotency key
        (answered replayed) or in the background by the sidecar that timed out: reported
        once, here; `recorded` skipped it (a replay, or no answer)."""

    def store_unavailable(self, operation: str, reason: str = "") -> None:
        """Redis did not answer an operation in time, or answered "not now" (MISCONF, OOM,
        LOADING...), or could not be reached: the fail mode then applies. `reason` says
        which, in the store's words."""

    def expired(self, count: int) -> None:
        """`count` reservations' leases ended with their hold in place; each is reported
        exactly once, by the script call that returned the hold."""

    def charged_at_lease_end(self, count: int, charges: Sequence[tuple[str, str, int]]) -> None:
        """`count` reservations' leases ended unsettled and their estimate was charged
        (on_expiry charge); each is reported exactly once, with what it charged:
        (provider, model, micro-USD), "" where the call named none."""

    def fail_open_charge(self, event: str, result: SettleResult | None) -> None:
        """A fail-open grant's charge (sidecar.fail_open): "queued" (Redis away: kept until
        it answers), "recorded" (at its settle), "recorded_later" (a queued one, now; with
        its result, whose spend no other event reported)."""

    def fail_open_dropped(self, reason: str) -> None:
        """A fail-open grant or queued charge was let go: "full", "lease_ended",
        "expired" (see sidecar.fail_open)."""


class NoEvents:
    def decided(self, operation: str, decision: Decision, seconds: float) -> None:
        pass

    def finished(self, operation: str, result: SettleResult, seconds: float) -> None:
        pass

    def recorded(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
        seconds: float,
    ) -> None:
        pass

    def late_charge(self, result: SettleResult) -> None:
        pass

    def late_record(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        pass

    def store_unavailable(self, operation: str, reason: str = "") -> None:
        pass

    def expired(self, count: int) -> None:
        pass

    def charged_at_lease_end(self, count: int, charges: Sequence[tuple[str, str, int]]) -> None:
        pass

    def fail_open_charge(self, event: str, result: SettleResult | None) -> None:
        pass

    def fail_open_dropped(self, reason: str) -> None:
        pass
