"""Calendar windows (sidecar/periods.py): exact boundaries in UTC and in zones with DST,
month lengths, leap years, year and quarter changes, the window cache, and a daily budget
that rolls over at local midnight through the real API."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.clock import FakeClock
from sidecar.model import Period
from sidecar.periods import TOTAL_END_MS, Window, WindowCache, iso, window
from tests.conftest import ClientFactory

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def ms(stamp: str) -> int:
    """Unix ms of an RFC 3339 instant written out in UTC ("2026-03-29T22:00:00.000Z")."""
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return round(parsed.timestamp() * 1000)


def span(w: Window) -> tuple[str, str]:
    """A window as two UTC instants, the form every expectation below is written in."""
    return iso(w.start_ms), iso(w.end_ms)


def assert_boundary(period: Period, zone: ZoneInfo, boundary: str) -> tuple[Window, Window]:
    """The last millisecond before `boundary` and the boundary itself are in adjacent
    windows that meet exactly there."""
    at = ms(boundary)
    before = window(period, at - 1, zone)
    after = window(period, at, zone)
    assert before.end_ms == at
    assert after.start_ms == at
    assert before.key != after.key
    assert before.start_ms <= at - 1 < before.end_ms
    return before, after


# ---- UTC ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "instant", "start", "end", "key"),
    [
        # 2026-03-10 is a Tuesday.
        (Period.DAILY, "2026-03-10T12:00:00Z", "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z",
         "d20260310"),
        (Period.WEEKLY, "2026-03-10T12:00:00Z", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z",
         "w20260309"),
        (Period.MONTHLY, "2026-03-10T12:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z",
         "m20260301"),
        (Period.QUARTERLY, "2026-03-10T12:00:00Z", "2026-01-01T00:00:00Z",
         "2026-04-01T00:00:00Z", "q20260101"),
        (Period.YEARLY, "2026-03-10T12:00:00Z", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z",
         "y20260101"),
        # A Monday at 00:00 starts its own ISO week; a Sunday 23:59:59.999 ends the previous.
        (Period.WEEKLY, "2026-03-16T00:00:00Z", "2026-03-16T00:00:00Z", "2026-03-23T00:00:00Z",
         "w20260316"),
        (Period.WEEKLY, "2026-03-15T23:59:59.999Z", "2026-03-09T00:00:00Z",
         "2026-03-16T00:00:00Z", "w20260309"),
        # ISO week 1 of 2026 starts on Monday 2025-12-29.
        (Period.WEEKLY, "2026-01-01T08:00:00Z", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z",
         "w20251229"),
        # ISO week 53 of 2026 runs into 2027.
        (Period.WEEKLY, "2027-01-03T23:59:59.999Z", "2026-12-28T00:00:00Z",
         "2027-01-04T00:00:00Z", "w20261228"),
        (Period.QUARTERLY, "2026-05-20T00:00:00Z", "2026-04-01T00:00:00Z",
         "2026-07-01T00:00:00Z", "q20260401"),
        (Period.QUARTERLY, "2026-08-31T00:00:00Z", "2026-07-01T00:00:00Z",
         "2026-10-01T00:00:00Z", "q20260701"),
        (Period.QUARTERLY, "2026-12-31T23:59:59.999Z", "2026-10-01T00:00:00Z",
         "2027-01-01T00:00:00Z", "q20261001"),
        (Period.MONTHLY, "2026-12-31T23:59:59.999Z", "2026-12-01T00:00:00Z",
         "2027-01-01T00:00:00Z", "m20261201"),
        # Leap years: February 2028 has 29 days, 2026 has 28, 2100 (a century) has 28,
        # 2000 (divisible by 400) has 29.
        (Period.MONTHLY, "2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z",
         "2028-03-01T00:00:00Z", "m20280201"),
        (Period.MONTHLY, "2026-02-28T23:59:59.999Z", "2026-02-01T00:00:00Z",
         "2026-03-01T00:00:00Z", "m20260201"),
        (Period.DAILY, "2028-02-29T23:59:59.999Z", "2028-02-29T00:00:00Z",
         "2028-03-01T00:00:00Z", "d20280229"),
        (Period.DAILY, "2100-02-28T12:00:00Z", "2100-02-28T00:00:00Z", "2100-03-01T00:00:00Z",
         "d21000228"),
        (Period.DAILY, "2000-02-28T12:00:00Z", "2000-02-28T00:00:00Z", "2000-02-29T00:00:00Z",
         "d20000228"),
        (Period.YEARLY, "2028-12-31T23:59:59.999Z", "2028-01-01T00:00:00Z",
         "2029-01-01T00:00:00Z", "y20280101"),
    ],
)  # fmt: skip
def test_utc_window_contents(period: Period, instant: str, start: str, end: str, key: str) -> None:
    w = window(period, ms(instant), UTC_ZONE)
    assert span(w) == (start, end)
    assert (w.start_ms, w.end_ms) == (ms(start), ms(end))
    assert w.key == key
    assert w.start == datetime.fromisoformat(start.replace("Z", "+00:00"))
    assert w.end == datetime.fromisoformat(end.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("period", "boundary", "key_before", "key_after"),
    [
        (Period.DAILY, "2026-03-11T00:00:00Z", "d20260310", "d20260311"),
        # Jan 31 -> Feb 1, Feb 28 -> Mar 1 (non-leap), Feb 28 -> 29 -> Mar 1 (leap 2028).
        (Period.DAILY, "2026-02-01T00:00:00Z", "d20260131", "d20260201"),
        (Period.DAILY, "2026-03-01T00:00:00Z", "d20260228", "d20260301"),
        (Period.DAILY, "2028-02-29T00:00:00Z", "d20280228", "d20280229"),
        (Period.DAILY, "2028-03-01T00:00:00Z", "d20280229", "d20280301"),
        (Period.DAILY, "2027-01-01T00:00:00Z", "d20261231", "d20270101"),
        (Period.WEEKLY, "2026-03-16T00:00:00Z", "w20260309", "w20260316"),
        (Period.WEEKLY, "2027-01-04T00:00:00Z", "w20261228", "w20270104"),
        (Period.MONTHLY, "2026-02-01T00:00:00Z", "m20260101", "m20260201"),
        (Period.MONTHLY, "2026-03-01T00:00:00Z", "m20260201", "m20260301"),
        (Period.MONTHLY, "2028-03-01T00:00:00Z", "m20280201", "m20280301"),
        (Period.MONTHLY, "2027-01-01T00:00:00Z", "m20261201", "m20270101"),
        (Period.QUARTERLY, "2026-04-01T00:00:00Z", "q20260101", "q20260401"),
        (Period.QUARTERLY, "2026-07-01T00:00:00Z", "q20260401", "q20260701"),
        (Period.QUARTERLY, "2026-10-01T00:00:00Z", "q20260701", "q20261001"),
        (Period.QUARTERLY, "2027-01-01T00:00:00Z", "q20261001", "q20270101"),
        (Period.YEARLY, "2027-01-01T00:00:00Z", "y20260101", "y20270101"),
    ],
)
def test_utc_rollover_is_exact(
    period: Period, boundary: str, key_before: str, key_after: str
) -> None:
    before, after = assert_boundary(period, UTC_ZONE, boundary)
    assert (before.key, after.key) == (key_before, key_after)


@pytest.mark.parametrize(
    ("period", "first", "last"),
    [
        (Period.DAILY, "2026-03-10T00:00:00Z", "2026-03-10T23:59:59.999Z"),
        (Period.WEEKLY, "2026-03-09T00:00:00Z", "2026-03-15T23:59:59.999Z"),
        (Period.MONTHLY, "2026-01-01T00:00:00Z", "2026-01-31T23:59:59.999Z"),
        (Period.MONTHLY, "2028-02-01T00:00:00Z", "2028-02-29T23:59:59.999Z"),
        (Period.QUARTERLY, "2026-01-01T00:00:00Z", "2026-03-31T23:59:59.999Z"),
        (Period.YEARLY, "2026-01-01T00:00:00Z", "2026-12-31T23:59:59.999Z"),
    ],
)
def test_key_is_equal_within_a_window(period: Period, first: str, last: str) -> None:
    lo, hi = ms(first), ms(last)
    probes = [lo, lo + 1, (lo + hi) // 2, hi - 1, hi]
    windows = {window(period, p, UTC_ZONE) for p in probes}
    assert len(windows) == 1
    (only,) = windows
    assert (only.start_ms, only.end_ms) == (lo, hi + 1)


@pytest.mark.parametrize(
    ("start", "days"),
    [
        ("2026-01-01T00:00:00Z", 31),
        ("2026-02-01T00:00:00Z", 28),
        ("2028-02-01T00:00:00Z", 29),
        ("2026-04-01T00:00:00Z", 30),
        ("2026-12-01T00:00:00Z", 31),
    ],
)
def test_month_lengths(start: str, days: int) -> None:
    w = window(Period.MONTHLY, ms(start), UTC_ZONE)
    assert w.end_ms - w.start_ms == days * DAY_MS


@pytest.mark.parametrize(("year", "days"), [(2026, 365), (2028, 366), (2100, 365), (2000, 366)])
def test_year_lengths(year: int, days: int) -> None:
    w = window(Period.YEARLY, ms(f"{year}-07-01T00:00:00Z"), UTC_ZONE)
    assert w.end_ms - w.start_ms == days * DAY_MS


# ---- zones with daylight saving time ------------------------------------------------------

# Europe/Berlin: CET (+01) in winter, CEST (+02) from 2026-03-29 02:00 to 2026-10-25 03:00.
# America/New_York: EST (-05) / EDT (-04), changing on 2026-03-08 and 2026-11-01.


@pytest.mark.parametrize(
    ("zone", "instant", "start", "end", "key", "hours"),
    [
        # Berlin, spring forward: local day 2026-03-29 is 23 hours long.
        (BERLIN, "2026-03-29T01:30:00Z", "2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z",
         "d20260329", 23),
        # Berlin, fall back: local day 2026-10-25 is 25 hours long.
        (BERLIN, "2026-10-25T01:30:00Z", "2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z",
         "d20261025", 25),
        # An ordinary Berlin winter and summer day.
        (BERLIN, "2026-03-10T12:00:00Z", "2026-03-09T23:00:00Z", "2026-03-10T23:00:00Z",
         "d20260310", 24),
        (BERLIN, "2026-07-01T12:00:00Z", "2026-06-30T22:00:00Z", "2026-07-01T22:00:00Z",
         "d20260701", 24),
        # 23:30 UTC on 2026-03-10 is already 2026-03-11 in Berlin.
        (BERLIN, "2026-03-10T23:30:00Z", "2026-03-10T23:00:00Z", "2026-03-11T23:00:00Z",
         "d20260311", 24),
        # New York, spring forward and fall back.
        (NEW_YORK, "2026-03-08T12:00:00Z", "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z",
         "d20260308", 23),
        (NEW_YORK, "2026-11-01T12:00:00Z", "2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z",
         "d20261101", 25),
        # 03:00 UTC on 2026-03-10 is still 2026-03-09 in New York.
        (NEW_YORK, "2026-03-10T03:00:00Z", "2026-03-09T04:00:00Z", "2026-03-10T04:00:00Z",
         "d20260309", 24),
    ],
)  # fmt: skip
def test_daily_window_in_zone(
    zone: ZoneInfo, instant: str, start: str, end: str, key: str, hours: int
) -> None:
    w = window(Period.DAILY, ms(instant), zone)
    assert span(w) == (start, end)
    assert w.key == key
    assert w.end_ms - w.start_ms == hours * HOUR_MS


@pytest.mark.parametrize(
    ("zone", "boundary", "key_before", "key_after"),
    [
        # Local midnights around the Berlin changes: 00:00 CET = 23:00Z, 00:00 CEST = 22:00Z.
        (BERLIN, "2026-03-28T23:00:00Z", "d20260328", "d20260329"),
        (BERLIN, "2026-03-29T22:00:00Z", "d20260329", "d20260330"),
        (BERLIN, "2026-10-24T22:00:00Z", "d20261024", "d20261025"),
        (BERLIN, "2026-10-25T23:00:00Z", "d20261025", "d20261026"),
        (NEW_YORK, "2026-03-08T05:00:00Z", "d20260307", "d20260308"),
        (NEW_YORK, "2026-03-09T04:00:00Z", "d20260308", "d20260309"),
        (NEW_YORK, "2026-11-01T04:00:00Z", "d20261031", "d20261101"),
        (NEW_YORK, "2026-11-02T05:00:00Z", "d20261101", "d20261102"),
    ],
)
def test_daily_rollover_in_zone_is_exact(
    zone: ZoneInfo, boundary: str, key_before: str, key_after: str
) -> None:
    before, after = assert_boundary(Period.DAILY, zone, boundary)
    assert (before.key, after.key) == (key_before, key_after)


def test_dst_change_inside_a_day_does_not_split_it() -> None:
    # 01:59:59.999 CET and 03:00:00.000 CEST on 2026-03-29 are one millisecond apart and
    # in the same local day; so are the two passes through 02:30 on 2026-10-25.
    spring = ms("2026-03-29T01:00:00Z")
    assert window(Period.DAILY, spring - 1, BERLIN) == window(Period.DAILY, spring, BERLIN)
    first_0230, second_0230 = ms("2026-10-25T00:30:00Z"), ms("2026-10-25T01:30:00Z")
    assert window(Period.DAILY, first_0230, BERLIN) == window(Period.DAILY, second_0230, BERLIN)


@pytest.mark.parametrize(
    ("period", "instant", "start", "end", "key"),
    [
        # The ISO week holding the spring change: Monday 2026-03-23 to Monday 2026-03-30,
        # 167 hours.
        (Period.WEEKLY, "2026-03-29T12:00:00Z", "2026-03-22T23:00:00Z",
         "2026-03-29T22:00:00Z", "w20260323"),
        (Period.WEEKLY, "2026-10-25T12:00:00Z", "2026-10-18T22:00:00Z",
         "2026-10-25T23:00:00Z", "w20261019"),
        (Period.MONTHLY, "2026-03-15T00:00:00Z", "2026-02-28T23:00:00Z",
         "2026-03-31T22:00:00Z", "m20260301"),
        (Period.MONTHLY, "2026-10-15T00:00:00Z", "2026-09-30T22:00:00Z",
         "2026-10-31T23:00:00Z", "m20261001"),
        (Period.QUARTERLY, "2026-02-01T00:00:00Z", "2025-12-31T23:00:00Z",
         "2026-03-31T22:00:00Z", "q20260101"),
        (Period.QUARTERLY, "2026-11-01T00:00:00Z", "2026-09-30T22:00:00Z",
         "2026-12-31T23:00:00Z", "q20261001"),
        (Period.YEARLY, "2026-06-01T00:00:00Z", "2025-12-31T23:00:00Z",
         "2026-12-31T23:00:00Z", "y20260101"),
        # 23:30 UTC on New Year's Eve is already next year in Berlin.
        (Period.YEARLY, "2026-12-31T23:30:00Z", "2026-12-31T23:00:00Z",
         "2027-12-31T23:00:00Z", "y20270101"),
    ],
)  # fmt: skip
def test_longer_windows_in_berlin(
    period: Period, instant: str, start: str, end: str, key: str
) -> None:
    w = window(period, ms(instant), BERLIN)
    assert span(w) == (start, end)
    assert w.key == key


def test_week_with_spring_change_is_167_hours_and_autumn_169() -> None:
    spring = window(Period.WEEKLY, ms("2026-03-25T00:00:00Z"), BERLIN)
    autumn = window(Period.WEEKLY, ms("2026-10-21T00:00:00Z"), BERLIN)
    assert spring.end_ms - spring.start_ms == 167 * HOUR_MS
    assert autumn.end_ms - autumn.start_ms == 169 * HOUR_MS


def test_same_instant_differs_by_zone() -> None:
    at = ms("2026-03-10T23:30:00Z")
    assert window(Period.DAILY, at, UTC_ZONE).key == "d20260310"
    assert window(Period.DAILY, at, BERLIN).key == "d20260311"
    assert window(Period.DAILY, at, NEW_YORK).key == "d20260310"


# ---- properties over many instants and zones ---------------------------------------------

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",  # +05:30, no DST
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/Santiago",  # DST starts at 24:00: local midnight does not exist that day
    "America/Havana",  # DST changes at 00:00 / 01:00
    "Pacific/Kiritimati",  # +14
]
_FIRST = ms("2011-01-01T00:00:00Z")
_LAST = ms("2099-12-31T00:00:00Z")
_LETTER = {
    Period.DAILY: "d",
    Period.WEEKLY: "w",
    Period.MONTHLY: "m",
    Period.QUARTERLY: "q",
    Period.YEARLY: "y",
}
_FIRST_DAY = {
    Period.DAILY: lambda d: d,
    Period.WEEKLY: lambda d: d - timedelta(days=d.weekday()),
    Period.MONTHLY: lambda d: d.replace(day=1),
    Period.QUARTERLY: lambda d: d.replace(month=(d.month - 1) // 3 * 3 + 1, day=1),
    Period.YEARLY: lambda d: d.replace(month=1, day=1),
}


@settings(max_examples=400, deadline=None)
@given(
    now=st.integers(min_value=_FIRST, max_value=_LAST),
    period=st.sampled_from([p for p in Period if p is not Period.TOTAL]),
    zone_name=st.sampled_from(ZONES),
)
def test_window_contains_now_and_its_edges_are_local_date_changes(
    now: int, period: Period, zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    w = window(period, now, zone)
    assert w.start_ms <= now < w.end_ms
    local_now = datetime.fromtimestamp(now / 1000, zone).date()
    first = _FIRST_DAY[period](local_now)
    assert w.key == f"{_LETTER[period]}{first:%Y%m%d}"
    # The start is where the local date turns into the window's first day.
    assert datetime.fromtimestamp(w.start_ms / 1000, zone).date() == first
    assert datetime.fromtimestamp((w.start_ms - 1) / 1000, zone).date() < first
    # Windows tile time: the one before ends at this start, the one after starts at the end.
    assert window(period, w.start_ms - 1, zone).end_ms == w.start_ms
    nxt = window(period, w.end_ms, zone)
    assert nxt.start_ms == w.end_ms
    assert nxt.key != w.key
    assert window(period, w.end_ms - 1, zone) == w


# ---- the cache ----------------------------------------------------------------------------


def test_cache_returns_the_same_window_until_its_end_then_a_fresh_one() -> None:
    cache = WindowCache()
    noon = ms("2026-03-10T12:00:00Z")
    first = cache.get(Period.DAILY, "UTC", noon)
    assert first.key == "d20260310"
    last_ms = cache.get(Period.DAILY, "UTC", ms("2026-03-10T23:59:59.999Z"))
    assert last_ms is first
    fresh = cache.get(Period.DAILY, "UTC", ms("2026-03-11T00:00:00Z"))
    assert fresh.key == "d20260311"
    assert fresh.start_ms == first.end_ms
    assert span(fresh) == ("2026-03-11T00:00:00Z", "2026-03-12T00:00:00Z")


def test_cache_in_berlin_rolls_over_at_local_midnight_on_a_short_day() -> None:
    cache = WindowCache()
    day = cache.get(Period.DAILY, "Europe/Berlin", ms("2026-03-29T12:00:00Z"))
    assert day.key == "d20260329"
    assert cache.get(Period.DAILY, "Europe/Berlin", ms("2026-03-29T21:59:59.999Z")) is day
    nxt = cache.get(Period.DAILY, "Europe/Berlin", ms("2026-03-29T22:00:00Z"))
    assert nxt.key == "d20260330"
    assert span(nxt) == ("2026-03-29T22:00:00Z", "2026-03-30T22:00:00Z")


def test_cache_follows_a_clock_set_backwards() -> None:
    cache = WindowCache()
    cache.get(Period.MONTHLY, "UTC", ms("2026-03-10T00:00:00Z"))
    earlier = cache.get(Period.MONTHLY, "UTC", ms("2026-02-28T23:59:59.999Z"))
    assert earlier.key == "m20260201"


def test_cache_keeps_zones_and_periods_apart() -> None:
    cache = WindowCache()
    at = ms("2026-03-10T23:30:00Z")
    assert cache.get(Period.DAILY, "UTC", at).key == "d20260310"
    assert cache.get(Period.DAILY, "Europe/Berlin", at).key == "d20260311"
    assert cache.get(Period.MONTHLY, "UTC", at).key == "m20260301"
    # And asking again still answers per zone, not from the other entry.
    assert cache.get(Period.DAILY, "UTC", at).key == "d20260310"


def test_iso_is_rfc3339_utc() -> None:
    assert iso(ms("2026-03-29T22:00:00Z")) == "2026-03-29T22:00:00Z"
    assert iso(0) == "1970-01-01T00:00:00Z"


# ---- end to end: a daily budget rolls over at local midnight ------------------------------

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def daily_doc(timezone: str | None) -> dict[str, Any]:
    budget: dict[str, Any] = {
        "id": "day",
        "name": "Daily",
        "scope": "organization",
        "limit_usd": 1.0,
        "period": "daily",
    }
    if timezone is not None:
        budget["timezone"] = timezone
    return {"budgets": [budget]}


async def authorize(client: Any, usd: float) -> dict[str, Any]:
    r = await client.post("/v1/authorize", json={"org_id": "acme", "estimated_usd": usd})
    assert r.status == 200
    body: dict[str, Any] = await r.json()
    return body


async def status(client: Any) -> dict[str, Any]:
    r = await client.get("/v1/budgets/day/status?scope_id=acme")
    assert r.status == 200
    body: dict[str, Any] = await r.json()
    return body


@pytest.mark.parametrize(
    ("timezone", "last_ms", "period_before", "period_after"),
    [
        # UTC (the default when a budget names no zone).
        (None, "2026-03-10T23:59:59.999Z",
         ("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z"),
         ("2026-03-11T00:00:00Z", "2026-03-12T00:00:00Z")),
        ("UTC", "2026-12-31T23:59:59.999Z",
         ("2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"),
         ("2027-01-01T00:00:00Z", "2027-01-02T00:00:00Z")),
        # Berlin on an ordinary winter day: 23:59:59.999 CET is 22:59:59.999Z.
        ("Europe/Berlin", "2026-03-10T22:59:59.999Z",
         ("2026-03-09T23:00:00Z", "2026-03-10T23:00:00Z"),
         ("2026-03-10T23:00:00Z", "2026-03-11T23:00:00Z")),
        # Berlin on the 23-hour day: 23:59:59.999 CEST on 2026-03-29 is 21:59:59.999Z.
        ("Europe/Berlin", "2026-03-29T21:59:59.999Z",
         ("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"),
         ("2026-03-29T22:00:00Z", "2026-03-30T22:00:00Z")),
        # Berlin on the 25-hour day: 23:59:59.999 CET on 2026-10-25 is 22:59:59.999Z.
        ("Europe/Berlin", "2026-10-25T22:59:59.999Z",
         ("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
         ("2026-10-25T23:00:00Z", "2026-10-26T23:00:00Z")),
        ("America/New_York", "2026-03-09T03:59:59.999Z",
         ("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"),
         ("2026-03-09T04:00:00Z", "2026-03-10T04:00:00Z")),
    ],
)  # fmt: skip
async def test_daily_budget_exhausted_before_midnight_is_available_at_midnight(
    make_client: ClientFactory,
    clock: FakeClock,
    timezone: str | None,
    last_ms: str,
    period_before: tuple[str, str],
    period_after: tuple[str, str],
) -> None:
    client = await make_client(daily_doc(timezone))
    clock.set(ms(last_ms))

    spent = await authorize(client, 1.0)
    assert spent["allowed"] is True
    denied = await authorize(client, 0.000001)
    assert denied["allowed"] is False
    assert denied["action"] == "block"
    assert denied["budget_info"]["budget_id"] == "day"

    before = await status(client)
    assert (before["period_start"], before["period_end"]) == period_before
    assert (before["used_usd"], before["held_usd"], before["remaining_usd"]) == (0.0, 1.0, 0.0)
    assert before["exceeded"] is True

    clock.advance(1)  # 00:00:00.000 local
    after = await status(client)
    assert (after["period_start"], after["period_end"]) == period_after
    assert (after["used_usd"], after["held_usd"], after["remaining_usd"]) == (0.0, 0.0, 1.0)
    for stamp in (*period_before, *period_after):
        assert RFC3339_UTC.match(stamp)

    again = await authorize(client, 1.0)
    assert again["allowed"] is True
    assert again["action"] == "allow"
    assert again["budgets"][0]["held_usd"] == 1.0

    # Going back one millisecond shows the old day, still exhausted.
    clock.advance(-1)
    old = await status(client)
    assert (old["period_start"], old["period_end"]) == period_before
    assert old["held_usd"] == 1.0


async def test_utc_and_berlin_budgets_roll_over_at_their_own_midnights(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    doc = {
        "budgets": [
            {"id": "utc", "name": "UTC day", "scope": "organization", "limit_usd": 1.0,
             "period": "daily"},
            {"id": "berlin", "name": "Berlin day", "scope": "organization", "limit_usd": 1.0,
             "period": "daily", "timezone": "Europe/Berlin"},
        ]
    }  # fmt: skip
    client = await make_client(doc)
    clock.set(ms("2026-03-10T22:59:59.999Z"))  # 23:59:59.999 in Berlin
    assert (await authorize(client, 1.0))["allowed"] is True

    clock.set(ms("2026-03-10T23:00:00Z"))  # midnight in Berlin, 23:00 in UTC
    blocked = await authorize(client, 0.5)
    assert blocked["allowed"] is False
    assert blocked["budget_info"]["budget_id"] == "utc"
    berlin = await (await client.get("/v1/budgets/berlin/status?scope_id=acme")).json()
    assert berlin["held_usd"] == 0.0
    assert (berlin["period_start"], berlin["period_end"]) == (
        "2026-03-10T23:00:00Z",
        "2026-03-11T23:00:00Z",
    )

    clock.set(ms("2026-03-11T00:00:00Z"))  # midnight in UTC too
    both = await authorize(client, 0.5)
    assert both["allowed"] is True
    assert [(b["budget_id"], b["held_usd"]) for b in both["budgets"]] == [
        ("utc", 0.5),
        ("berlin", 0.5),
    ]


def test_a_period_total_window_covers_all_time_under_one_key() -> None:
    """period total: one counter from the first call on (no date in its key, so the
    sweep's date cutoffs never collect it: its idle time does)."""
    for now in (0, 1_773_144_000_000, TOTAL_END_MS - 1):
        w = window(Period.TOTAL, now, ZoneInfo("Europe/Berlin"))
        assert (w.start_ms, w.end_ms, w.key) == (0, TOTAL_END_MS, "t")
