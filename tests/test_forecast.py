"""Forecasts (issue 19): forecast_usd and exhausted_at on status and decisions, and the
forecast alert.

1. The estimator (sidecar/forecast.py) with an injected clock, against values computed by
   hand from the formula in its docstring: a steady burn, a burst, an idle budget, a
   period boundary (exact to the micro-USD and the second).
2. Lua's copy of the arithmetic (lua/_lib.lua, which decides the forecast alert) agrees
   with Python's on real Redis, and the window the charges keep is the one Python reads.
3. In process (fake clock, real Redis): status, the AxonFlow status route and decisions
   carry the forecast; the alert is raised once per counter and period, and again in the
   next period.
4. Real sidecars: a daily $1 budget that spends $0.90 in a burst early in its period is
   forecast past $1 and exhausted before period_end; an idle one is not; 100 concurrent
   settles across two sidecar processes deliver exactly one forecast alert to a webhook.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis

from sidecar.clock import FakeClock
from sidecar.forecast import WINDOW_S, Forecast, forecast, parse_window
from sidecar.periods import iso
from tests.harness import RedisServer, SidecarProcess, request_json, sidecars
from tests.test_webhooks import QUIET_S, SECRET, Receiver, eventually, verify

# 2026-01-01T00:00:00Z, a multiple of WINDOW_S: bucket indexes below are S // 600 + n.
S = 1_767_225_600
DAY = 86_400
START_MS, END_MS = S * 1000, (S + DAY) * 1000
K0 = S // WINDOW_S  # 2945376


# ---- 1. the estimator, by hand ------------------------------------------------------------


def test_steady_burn() -> None:
    """$0.50 an hour since midnight, at 06:05 (e = 300 s into bucket K0 + 36):
    R = 41,666 + 83,333 * 300 / 600 = 41,666 + 41,666 = 83,332
    P = 3,041,666 * 600 / 21,900 = 83,333
    forecast = 3,041,666 + (83,332 + 83,333) * 64,500 / 1,200 = 3,041,666 + 8,958,243
    exhausted: (10,000,000 - 3,041,666) * 1,200 / 166,665 = 50,100.005 -> 50,101 s."""
    now = S + 21_900
    f = forecast(3_041_666, 0, 10_000_000, (K0 + 36, 41_666, 83_333), START_MS, END_MS,
                 now * 1000)  # fmt: skip
    assert f == Forecast(11_999_909, (now + 50_101) * 1000)


def test_a_burst_reacts_within_minutes() -> None:
    """$0.90 in the first five minutes of a $1 day: R = 900,000; P = 900,000 * 600 / 600
    (a period younger than one window counts as one window) = 900,000;
    forecast = 900,000 + 1,800,000 * 86,100 / 1,200 = 130,050,000;
    exhausted: 100,000 * 1,200 / 1,800,000 = 66.7 -> 67 s."""
    now = S + 300
    f = forecast(900_000, 0, 1_000_000, (K0, 900_000, 0), START_MS, END_MS, now * 1000)
    assert f == Forecast(130_050_000, (now + 67) * 1000)
    # Held money is committed: it counts like spend (and here reaches the limit: now).
    f = forecast(900_000, 100_000, 1_000_000, (K0, 900_000, 0), START_MS, END_MS, now * 1000)
    assert f == Forecast(130_150_000, now * 1000)


def test_an_idle_budget_is_not_forecast_to_run_out() -> None:
    """Nothing spent: nothing projected. $0.20 spent at 05:00 and idle since, at 12:00:
    the window's buckets are past (R = 0), P = 200,000 * 600 / 43,200 = 2,777;
    forecast = 200,000 + 2,777 * 43,200 / 1,200 = 299,972: no exhaustion."""
    noon = (S + 43_200) * 1000
    assert forecast(0, 0, 1_000_000, (0, 0, 0), START_MS, END_MS, noon) == Forecast(0, None)
    assert forecast(0, 0, 1_000_000, parse_window(None), START_MS, END_MS, noon) == (0, None)
    f = forecast(200_000, 0, 1_000_000, (K0 + 30, 200_000, 0), START_MS, END_MS, noon)
    assert f == Forecast(299_972, None)


def test_the_window_slides_over_two_buckets() -> None:
    """The field's current bucket becomes the previous one: at 10 s into the next bucket,
    R = 0 + 600,000 * 590 / 600 = 590,000; P = 600,000 * 600 / 610 = 590,163."""
    now = S + 610
    f = forecast(600_000, 0, 100_000_000, (K0, 600_000, 0), START_MS, END_MS, now * 1000)
    # (590,000 + 590,163) * 85,790 / 1,200 = 84,371,819
    assert f == Forecast(600_000 + 84_371_819, None)
    # Two buckets on, the window says nothing: only the period's average is left.
    now = S + 1_200
    f = forecast(600_000, 0, 100_000_000, (K0, 600_000, 0), START_MS, END_MS, now * 1000)
    assert f == Forecast(600_000 + 21_300_000, None)  # (0 + 300,000) * 85,200 / 1,200


def test_the_period_boundary() -> None:
    """One second before the period ends, R = 400,000 (e = 599), P = 500,000 * 600 /
    86,399 = 3,472: 403,472 * 1 / 1,200 = 336 more. At the end itself nothing remains to
    project; the next period's counter starts empty (a new counter id)."""
    last = S + DAY - 1
    f = forecast(500_000, 0, 1_000_000, (last // 600, 400_000, 0), START_MS, END_MS,
                 last * 1000)  # fmt: skip
    assert f == Forecast(500_336, None)
    f = forecast(500_000, 0, 1_000_000, (last // 600, 400_000, 0), START_MS, END_MS, END_MS)
    assert f == Forecast(500_000, None)
    # ...but a spend that reaches the limit in the last second is still inside the period.
    f = forecast(999_900, 0, 1_000_000, (last // 600, 999_900, 0), START_MS, END_MS,
                 last * 1000)  # fmt: skip
    assert f.exhausted_at_ms == END_MS and f.forecast_micro >= 1_000_000
    nxt = forecast(0, 0, 1_000_000, parse_window(None), END_MS, END_MS + DAY * 1000, END_MS)
    assert nxt == Forecast(0, None)


def test_exhausted_at_is_set_exactly_when_the_forecast_reaches_the_limit() -> None:
    rng = random.Random(19)
    for _ in range(5_000):
        used, held = rng.randrange(0, 2_000_000), rng.choice([0, rng.randrange(0, 50_000)])
        now_s = S + rng.randrange(0, DAY)
        k = now_s // 600 - rng.choice([0, 0, 1, 2])
        window = (k, rng.randrange(0, used + 1), rng.randrange(0, 300_000))
        f = forecast(used, held, 1_000_000, window, START_MS, END_MS, now_s * 1000)
        assert (f.exhausted_at_ms is not None) == (f.forecast_micro >= 1_000_000), (used, window)
        if f.exhausted_at_ms is not None:
            assert now_s * 1000 <= f.exhausted_at_ms <= END_MS


# ---- 2. Lua agrees --------------------------------------------------------------------


_LUA_FORECAST = (
    (Path(__file__).resolve().parent.parent / "lua" / "_lib.lua").read_text()
    + """
-- capped: past 2^63 a Lua number does not convert to a Redis integer at all
return math.min(forecast_of(tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6])), 2^53)
"""
)


def test_lua_and_python_compute_the_same_forecast(redis_client: redis.Redis) -> None:
    """Random figures, realistic and extreme (a $1e9 budget, a yearly period): the script
    that decides the alert and the sidecar that reports agree to the micro-USD."""
    lua = redis_client.register_script(_LUA_FORECAST)
    rng = random.Random(7)
    year_ms = 366 * DAY * 1000
    for i in range(600):
        big = i % 5 == 0
        top = 10**15 if big else 5_000_000
        used, held = rng.randrange(0, top), rng.randrange(0, top // 10 + 1)
        start = START_MS
        end = start + (year_ms if i % 3 == 0 else DAY * 1000)
        now = rng.randrange(start, end + 1)
        k = now // 1000 // 600 - rng.choice([0, 0, 1, 2, -1])
        window = f"{k}:{rng.randrange(0, top)}:{rng.randrange(0, top)}"
        if i % 50 == 0:
            window = ""
        expected = forecast(used, held, 0, parse_window(window), start, end, now).forecast_micro
        got = lua(args=[used, held, window, start, end, now])
        if expected < 2**53:
            assert got == expected, (used, held, window, start, end, now)
        else:  # past 2^53 Lua's doubles round, but stay past any limit (at most 1e15)
            assert got >= 10**15


async def test_charges_keep_the_window_python_reads(
    make_client: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """What settle and record write into w:<cid>: spend per 10-minute bucket, the current
    and the previous one."""
    client = await make_client(DOC)
    cid = f"cap/team-1/d{datetime.fromtimestamp(S, UTC):%Y%m%d}"
    clock.set((S + 30) * 1000)
    await record(client, 0.1)
    await authorize_settle(client, 0.05)
    assert redis_client.hget("bs:{default}:ctr", f"w:{cid}") == f"{K0}:150000:0"
    clock.set((S + 650) * 1000)
    await record(client, 0.02)
    assert redis_client.hget("bs:{default}:ctr", f"w:{cid}") == f"{K0 + 1}:20000:150000"
    clock.set((S + 2_000) * 1000)
    await record(client, 0.03)
    assert redis_client.hget("bs:{default}:ctr", f"w:{cid}") == f"{K0 + 3}:30000:0"


# ---- 3. in process: the surfaces and the alert -------------------------------------------

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "cap", "name": "Team cap", "scope": "team", "scope_id": "team-1", "limit_usd": 1.0,
         "period": "daily", "forecast_alert": True, "alert_thresholds": [1000]},
        {"id": "quiet", "name": "Quiet", "scope": "team", "scope_id": "team-2",
         "limit_usd": 1.0, "period": "daily"},
    ],
    "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
                 "output_per_1k": 0.01}],
}  # fmt: skip


async def record(client: Any, usd: float) -> None:
    resp = await client.post("/v1/record", json={"team_id": "team-1", "cost_usd": usd})
    assert resp.status == 200, await resp.text()


async def authorize_settle(client: Any, usd: float) -> dict[str, Any]:
    resp = await client.post("/v1/authorize", json={"team_id": "team-1", "estimated_usd": usd})
    decision: dict[str, Any] = await resp.json()
    assert resp.status == 200 and decision["allowed"], decision
    resp = await client.post(
        "/v1/settle", json={"reservation_id": decision["reservation_id"], "cost_usd": usd}
    )
    assert resp.status == 200, await resp.text()
    return decision


async def status(client: Any, path: str) -> dict[str, Any]:
    resp = await client.get(path)
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


def forecast_alerts(redis_client: redis.Redis, tenant: str = "default") -> list[dict[str, str]]:
    entries = redis_client.xrange(f"bs:{{{tenant}}}:alerts")
    return [fields for _id, fields in entries if fields.get("k") == "f"]


async def test_status_and_decisions_carry_the_forecast_exactly(
    make_client: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    clock.set((S + 300) * 1000)
    await record(client, 0.9)  # the burst of test_a_burst_reacts_within_minutes
    body = await status(client, "/v1/budgets/cap/status?scope_id=team-1")
    assert body["forecast_usd"] == 130.05
    assert body["exhausted_at"] == iso((S + 367) * 1000) == "2026-01-01T00:06:07Z"
    assert body["exhausted_at"] < body["period_end"] == "2026-01-02T00:00:00Z"
    ax = await status(client, "/api/v1/budgets/cap/status?scope_id=team-1")
    assert (ax["forecast_usd"], ax["exhausted_at"]) == (130.05, "2026-01-01T00:06:07Z")
    # A decision: the same figures, with its own hold counted (committed money):
    # 900,000 used + 10,000 held + 1,800,000 * 86,100 / 1,200.
    resp = await client.post("/v1/check", json={"team_id": "team-1", "estimated_usd": 0.01})
    (state,) = [b for b in (await resp.json())["budgets"] if b["budget_id"] == "cap"]
    assert (state["forecast_usd"], state["exhausted_at"]) == (130.05, "2026-01-01T00:06:07Z")
    resp = await client.post("/v1/authorize", json={"team_id": "team-1", "estimated_usd": 0.01})
    decision = await resp.json()
    (state,) = [b for b in decision["budgets"] if b["budget_id"] == "cap"]
    assert state["held_usd"] == 0.01
    # 90,000 left * 1,200 / 1,800,000 = 60 s.
    assert (state["forecast_usd"], state["exhausted_at"]) == (130.06, "2026-01-01T00:06:00Z")
    # An idle budget: nothing spent, nothing forecast.
    idle = await status(client, "/v1/budgets/quiet/status")
    assert (idle["forecast_usd"], idle["exhausted_at"]) == (0.0, None)


async def test_the_forecast_alert_is_raised_once_per_period(
    make_client: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    # Slow spend: $0.01 an hour from 01:00 (forecast at 03:00: 30,000 + (10,000 + 1,666) *
    # 75,600 / 1,200 = 764,958) does not reach $1 a day...
    for hour in range(1, 4):
        clock.set((S + hour * 3600) * 1000)
        await record(client, 0.01)
    assert forecast_alerts(redis_client) == []
    # ...a burst at 04:00 is: the charge that takes the forecast past the limit alerts.
    clock.set((S + 4 * 3600) * 1000)
    await authorize_settle(client, 0.2)
    (alert,) = forecast_alerts(redis_client)
    used, window = int(alert["u"]), parse_window(alert["w"])
    f = forecast(used, int(alert["h"]), 1_000_000, window, START_MS, END_MS, int(alert["at"]))
    assert used == 230_000 and f.exhausted_at_ms is not None  # Lua's verdict is Python's
    # More charges, in the same period: no second alert.
    for n in range(5):
        clock.set((S + 5 * 3600 + n) * 1000)
        await record(client, 0.05)
    assert len(forecast_alerts(redis_client)) == 1
    resp = await client.get("/api/v1/budgets/cap/alerts")
    (shown,) = [a for a in (await resp.json())["alerts"] if a["alert_type"] == "forecast"]
    assert shown["id"] == "default/cap/team-1/d20260101/forecast"
    assert shown["exhausted_at"] == iso(f.exhausted_at_ms)
    assert shown["forecast_usd"] == f.forecast_micro / 1e6
    # A budget without forecast_alert never alerts, however fast it burns.
    resp = await client.post("/v1/record", json={"team_id": "team-2", "cost_usd": 0.9})
    assert resp.status == 200
    assert len(forecast_alerts(redis_client)) == 1
    # The next period is a new counter: it alerts again, once.
    clock.set((S + DAY + 60) * 1000)
    await record(client, 0.5)
    await record(client, 0.1)
    assert [a["cid"] for a in forecast_alerts(redis_client)] == [
        "cap/team-1/d20260101",
        "cap/team-1/d20260102",
    ]


# ---- 4. real sidecars ----------------------------------------------------------------


def zone_early_in_its_day() -> str:
    """An Etc/GMT zone whose local day began less than an hour ago, so that a budget in it
    is early in its period whatever the time of the run (Etc/GMT-N is UTC+N)."""
    now = datetime.now(UTC)
    for offset in range(-12, 15):
        if (now + timedelta(hours=offset)).hour == 0:
            return f"Etc/GMT{-offset:+d}" if offset else "UTC"
    raise AssertionError("every hour of the day is some zone's first")


def test_a_burst_early_in_the_period_is_forecast_to_run_out(
    redis_server: RedisServer, write_config: Any
) -> None:
    zone = zone_early_in_its_day()
    path = write_config({"budgets": [
        {"id": "daily", "name": "Daily", "scope": "team", "scope_id": "t1", "limit_usd": 1.0,
         "period": "daily", "timezone": zone},
        {"id": "idle", "name": "Idle", "scope": "team", "scope_id": "t2", "limit_usd": 1.0,
         "period": "daily", "timezone": zone},
    ]})  # fmt: skip
    sidecar = SidecarProcess(redis_server.url, str(path)).start()
    try:
        for _ in range(9):  # $0.90 in a burst of nine calls
            code, d = request_json(sidecar.url + "/v1/authorize",
                                   {"team_id": "t1", "estimated_usd": 0.1})  # fmt: skip
            assert code == 200 and d["allowed"], d
            settle = {"reservation_id": d["reservation_id"], "cost_usd": 0.1}
            code, s = request_json(sidecar.url + "/v1/settle", settle)
            assert code == 200, s
        code, body = request_json(sidecar.url + "/v1/budgets/daily/status")
        assert code == 200, body
        assert body["used_usd"] == 0.9
        assert body["forecast_usd"] > 1
        assert body["exhausted_at"] is not None
        assert body["period_start"] < body["exhausted_at"] < body["period_end"]
        code, ax = request_json(sidecar.url + "/api/v1/budgets/daily/status")
        assert ax["forecast_usd"] > 1 and ax["exhausted_at"] == body["exhausted_at"]
        code, idle = request_json(sidecar.url + "/v1/budgets/idle/status")
        assert code == 200 and idle["forecast_usd"] == 0 and idle["exhausted_at"] is None
        code, ax_idle = request_json(sidecar.url + "/api/v1/budgets/idle/status")
        assert ax_idle["exhausted_at"] is None
    finally:
        sidecar.cleanup()


async def test_one_forecast_alert_per_period_under_100_concurrent_settles_on_two_sidecars(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Any
) -> None:
    """100 calls of $0.006 on a $1 daily budget, spread over two sidecar processes, all
    authorized first and then settled at once: the forecast passes the limit on one of the
    settles, and the webhook receives exactly one forecast alert (and the 50% threshold
    alert once, as before)."""
    receiver = await Receiver().start()
    path: Path = write_config({
        "budgets": [{"id": "daily", "name": "Daily", "scope": "team", "scope_id": "t1",
                     "limit_usd": 1.0, "period": "daily", "alert_thresholds": [50],
                     "forecast_alert": True}],
        "webhooks": [{"name": "ops", "url": receiver.url(), "secret": SECRET}],
    })  # fmt: skip
    try:
        with sidecars(redis_server.url, str(path), 2) as procs:
            async with aiohttp.ClientSession() as http:

                async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
                    async with http.post(url, json=body) as resp:
                        answer: dict[str, Any] = await resp.json()
                        assert resp.status == 200, answer
                        return answer

                decisions = await asyncio.gather(*(
                    post(procs[i % 2].url + "/v1/authorize",
                         {"team_id": "t1", "estimated_usd": 0.006})
                    for i in range(100)
                ))  # fmt: skip
                assert all(d["allowed"] for d in decisions)
                await asyncio.gather(*(
                    post(procs[(i + 1) % 2].url + "/v1/settle",
                         {"reservation_id": d["reservation_id"], "cost_usd": 0.006})
                    for i, d in enumerate(decisions)
                ))  # fmt: skip
            assert len(forecast_alerts(redis_client)) == 1
            await eventually(lambda: len(receiver.acked()) == 2, "two alerts delivered")
            await asyncio.sleep(QUIET_S)
        kinds = sorted(d.alert["alert_type"] for d in receiver.deliveries)
        assert kinds == ["forecast", "threshold_reached"], kinds
        for d in receiver.deliveries:
            verify(d)
        (alert,) = [d.alert for d in receiver.deliveries if d.alert["alert_type"] == "forecast"]
        assert alert["budget_id"] == "daily" and alert["entity"] == "t1"
        assert alert["forecast_usd"] > 1 and alert["exhausted_at"] is not None
    finally:
        await receiver.stop()
