"""Time, injected: production reads the system clock, tests move a fake one.

The clock's reading is passed to every script (ARGV now_ms), so lease ends and period
windows follow one source. Replicas on different hosts need NTP-synced clocks; a skew of
d ms moves a lease end by at most d ms.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, ms: int) -> None:
        self._now_ms += ms

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms
