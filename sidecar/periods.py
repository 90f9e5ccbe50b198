"""Calendar periods: the window [start, end) that contains an instant, in a time zone.

Boundaries are local midnights of the budget's zone (UTC unless it names one), so a
daily budget in Europe/Berlin rolls over at 00:00 Berlin time, also across a DST change
(that day is 23 or 25 hours long). Weeks are ISO weeks, starting on Monday.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sidecar.model import Period

_LETTER = {
    Period.DAILY: "d",
    Period.WEEKLY: "w",
    Period.MONTHLY: "m",
    Period.QUARTERLY: "q",
    Period.YEARLY: "y",
}
# A period-total counter's window: from the epoch to the last second of year 9999. Its
# key carries no date, so the sweep's date cutoffs never collect it: its idle time does.
TOTAL_END_MS = 253_402_300_799_000
TOTAL_KEY = "t"


@dataclass(frozen=True, slots=True)
class Window:
    start_ms: int
    end_ms: int
    # Names the window in counter ids: the period letter and the local start date.
    key: str

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.start_ms / 1000, UTC)

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(self.end_ms / 1000, UTC)


def _first_day(period: Period, day: date) -> date:
    if period is Period.DAILY:
        return day
    if period is Period.WEEKLY:
        return day - timedelta(days=day.weekday())
    if period is Period.MONTHLY:
        return day.replace(day=1)
    if period is Period.QUARTERLY:
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    return day.replace(month=1, day=1)


def _next_first_day(period: Period, first: date) -> date:
    if period is Period.DAILY:
        return first + timedelta(days=1)
    if period is Period.WEEKLY:
        return first + timedelta(days=7)
    months = {Period.MONTHLY: 1, Period.QUARTERLY: 3, Period.YEARLY: 12}[period]
    month0 = first.month - 1 + months
    return date(first.year + month0 // 12, month0 % 12 + 1, 1)


def _local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    # fold=0 picks the first of two ambiguous instants; zones whose DST change happens at
    # midnight (none of the common ones today) would start the day at 01:00 instead.
    local = datetime(day.year, day.month, day.day, tzinfo=zone)
    return int(local.timestamp() * 1000)


def window(period: Period, now_ms: int, zone: ZoneInfo) -> Window:
    """The window of `period` in `zone` that contains `now_ms` (Unix ms)."""
    if period is Period.TOTAL:
        return Window(start_ms=0, end_ms=TOTAL_END_MS, key=TOTAL_KEY)
    local_day = datetime.fromtimestamp(now_ms / 1000, zone).date()
    first = _first_day(period, local_day)
    following = _next_first_day(period, first)
    return Window(
        start_ms=_local_midnight_ms(first, zone),
        end_ms=_local_midnight_ms(following, zone),
        key=f"{_LETTER[period]}{first:%Y%m%d}",
    )


class WindowCache:
    """Remembers the current window per (period, zone) until it ends.

    Computing a zoned window costs a few microseconds; the hot path asks for the same
    handful of windows on every decision.
    """

    def __init__(self) -> None:
        self._windows: dict[tuple[Period, str], Window] = {}

    def get(self, period: Period, zone_name: str, now_ms: int) -> Window:
        cached = self._windows.get((period, zone_name))
        if cached is not None and cached.start_ms <= now_ms < cached.end_ms:
            return cached
        fresh = window(period, now_ms, ZoneInfo(zone_name))
        self._windows[(period, zone_name)] = fresh
        return fresh


_last_iso: tuple[int, str] = (-1, "")


def iso(ms: int) -> str:
    """RFC 3339 UTC with a Z (second precision), the timestamp form every surface returns.

    Decisions made in the same second share the string: formatting a datetime per
    decision showed up at 4% of the hot path's CPU.
    """
    global _last_iso
    second = ms // 1000
    if _last_iso[0] != second:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _last_iso = (second, text)
    return _last_iso[1]
