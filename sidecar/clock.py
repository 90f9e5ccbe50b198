"""Time, injected: production reads the system clock, tests move a fake one.

The clock's reading is passed to every script (ARGV now_ms), so lease ends and period
windows follow one source. Rate limiters, and stops' expiries, read Redis TIME instead
(see limiter_ms): they need the order in which Redis runs calls from many replicas, not
each replica's view (a stop made on one replica must end at the same moment on all).
Replicas on different hosts need NTP-synced clocks; a skew of d ms moves a lease end by
at most d ms.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...

    def limiter_ms(self) -> str:
        """The time rate limiters use, as a script argument: '' lets each script read Redis
        TIME, the one clock all replicas share; a fake clock passes its own reading."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def limiter_ms(self) -> str:
        return ""


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms

    def limiter_ms(self) -> str:
        return str(self._now_ms)

    def advance(self, ms: int) -> None:
        self._now_ms += ms

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms
