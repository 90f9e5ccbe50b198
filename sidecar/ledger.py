"""Reads of the usage ledger and its daily aggregates (written by settle.lua and
record.lua, see lua/_lib.lua `ledger()`).

- The ledger is one Redis stream per tenant: an entry per charge, newest last, capped by
  `settings.usage_max_records` and `settings.usage_max_age_days`.
- The aggregates are two hashes per tenant and UTC day: cost, requests and tokens per
  (provider, model, org, team, agent, workflow), kept `usage_aggregate_days`; and per
  (user, step) of the calls that name one, kept the shorter `usage_user_aggregate_days`
  (users and steps are many: issue 16). A period's summary or breakdown reads its days
  (31 of each for a month, 366 for a year) instead of the records, so it stays cheap
  however many calls there were, and it is exact even after the ledger's records were
  trimmed. A breakdown by user or step counts a day whose per-user hash has expired
  under "" (totals stay exact; only the attribution is gone).

Usage periods are UTC calendar windows (a budget's own time zone does not apply).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import msgspec
import redis.asyncio as aioredis

from sidecar import keys
from sidecar.model import Period
from sidecar.money import micro_to_usd
from sidecar.periods import Window, iso, window

# The ledger tuple (lua/_lib.lua, record field 11), in order; "run" is on records only.
TUPLE = ("provider", "model", "org", "team", "agent", "workflow", "user", "step", "run")
# group_by values -> tuple position ("organization" and "org" both name the org).
GROUP_BY: dict[str, int] = {
    "provider": 0,
    "model": 1,
    "org": 2,
    "organization": 2,
    "team": 3,
    "agent": 4,
    "workflow": 5,
    "user": 6,
    "step": 7,
}
_SEP = "\x1f"
_UTC = ZoneInfo("UTC")
_SCAN_CHUNK = 1000
_DAY_MS = 86_400_000


@dataclass(slots=True)
class Totals:
    cost_micro: int = 0
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def merge(self, other: Totals) -> None:
        self.cost_micro += other.cost_micro
        self.requests += other.requests
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out

    def add(self, kind: str, value: int) -> None:
        if kind == "c":
            self.cost_micro += value
        elif kind == "n":
            self.requests += value
        elif kind == "i":
            self.tokens_in += value
        elif kind == "o":
            self.tokens_out += value


_USER, _STEP = GROUP_BY["user"], GROUP_BY["step"]


@dataclass(slots=True)
class PeriodUsage:
    window: Window
    # ledger tuple (provider .. workflow; before issue 16 also user and step) -> totals
    by_tuple: dict[tuple[str, ...], Totals] = field(default_factory=dict)
    # (user, step) -> totals, of the days whose per-user hash is still kept
    by_user: dict[tuple[str, str], Totals] = field(default_factory=dict)

    @property
    def total(self) -> Totals:
        out = Totals()
        for t in self.by_tuple.values():
            out.merge(t)
        return out

    def grouped(self, position: int) -> dict[str, Totals]:
        out: dict[str, Totals] = defaultdict(Totals)
        for tup, t in self.by_tuple.items():
            out[tup[position] if position < len(tup) else ""].merge(t)
        if position in (_USER, _STEP):
            # The per-user totals are also in the "" of the totals' tuples (which leave
            # user and step out): move them from "" to their user or step.
            which = 0 if position == _USER else 1
            for pair, t in self.by_user.items():
                if pair[which]:
                    out[pair[which]].merge(t)
                    out[""].merge(_negative(t))
            if "" in out and out[""] == Totals():
                del out[""]
        return dict(out)


def _negative(t: Totals) -> Totals:
    return Totals(-t.cost_micro, -t.requests, -t.tokens_in, -t.tokens_out)


def _days(w: Window, now_ms: int) -> list[str]:
    """yyyymmdd of every UTC day of the window up to now."""
    last = min(w.end_ms - 1, now_ms)
    out = []
    day = w.start_ms // _DAY_MS
    while day * _DAY_MS <= last:
        out.append(iso(day * _DAY_MS)[:10].replace("-", ""))
        day += 1
    return out


async def period_usage(
    client: aioredis.Redis, tenant: str, period: Period, now_ms: int
) -> PeriodUsage:
    """The tenant's usage in the current UTC `period` window, from the daily aggregates."""
    w = window(period, now_ms, _UTC)
    tk = keys.tenant_keys(tenant)
    pipe = client.pipeline(transaction=False)
    for day in _days(w, now_ms):
        pipe.hgetall(tk.usage_day(day))
        pipe.hgetall(tk.user_day(day))
    usage = PeriodUsage(w)
    replies = await pipe.execute()
    for fields in replies[0::2]:
        for name, raw in fields.items():
            kind, tup = name[0], tuple(name[2:].split(_SEP))
            totals = usage.by_tuple.get(tup)
            if totals is None:
                totals = usage.by_tuple[tup] = Totals()
            totals.add(kind, int(raw))
    for fields in replies[1::2]:
        for name, raw in fields.items():
            user, _, step = name.partition(_SEP)
            cost, requests, tokens_in, tokens_out = (int(v) for v in raw.split(":"))
            pair = (user, step)
            totals = usage.by_user.get(pair)
            if totals is None:
                totals = usage.by_user[pair] = Totals()
            totals.merge(Totals(cost, requests, tokens_in, tokens_out))
    return usage


_KIND = {"s": "settle", "r": "record", "x": "expiry"}
_PRICED_BY = {"t": "tokens", "c": "cost", "e": "estimate"}


class UsageRecord(msgspec.Struct, kw_only=True):
    """One ledger entry, in the AxonFlow SDK's UsageRecord shape plus run and step."""

    id: str
    request_id: str | None
    tenant_id: str
    org_id: str | None
    team_id: str | None
    agent_id: str | None
    workflow_id: str | None
    user_id: str | None
    step_id: str | None
    run_id: str | None
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: int | None
    success: bool
    # settle | record | expiry (a hold that was charged when its lease ended unsettled)
    kind: str
    # What priced the charge: tokens, cost (given), or estimate (the held estimate: no
    # price for the model, or a hold charged at its lease end).
    priced_by: str
    created_at: str


def _record(tenant: str, entry_id: str, f: Mapping[str, str]) -> UsageRecord:
    parts = (*f.get("m", "").split(_SEP), *([""] * len(TUPLE)))
    ids = dict(zip(TUPLE, parts, strict=False))
    latency = f.get("l", "")
    return UsageRecord(
        id=entry_id,
        request_id=f.get("q") or None,
        tenant_id=tenant,
        org_id=ids["org"] or None,
        team_id=ids["team"] or None,
        agent_id=ids["agent"] or None,
        workflow_id=ids["workflow"] or None,
        user_id=ids["user"] or None,
        step_id=ids["step"] or None,
        run_id=ids["run"] or None,
        provider=ids["provider"],
        model=ids["model"],
        tokens_in=int(f.get("i", 0)),
        tokens_out=int(f.get("o", 0)),
        cost_usd=micro_to_usd(int(f.get("c", 0))),
        latency_ms=int(latency) if latency else None,
        success=f.get("s") != "0",
        kind=_KIND.get(f.get("k", ""), "record"),
        priced_by=_PRICED_BY.get(f.get("p", "c"), "cost"),
        created_at=iso(int(f.get("at", 0))),
    )


async def records(
    client: aioredis.Redis,
    tenant: str,
    *,
    limit: int,
    offset: int,
    provider: str | None = None,
    model: str | None = None,
) -> tuple[list[UsageRecord], int]:
    """A page of the tenant's records, newest first, and how many match in all.

    Unfiltered, the total is the stream's length and only the page is read; filtered by
    provider or model, the whole ledger is scanned (it is bounded by usage_max_records).
    """
    stream = keys.tenant_keys(tenant).usage
    if provider is None and model is None:
        total = int(await client.xlen(stream))
        raw: list[tuple[str, dict[str, str]]] = []
        if offset < total:
            raw = await client.xrevrange(stream, count=offset + limit)  # type: ignore[assignment]
        return [_record(tenant, i, f) for i, f in raw[offset:]], total
    page: list[UsageRecord] = []
    total = 0
    for entry_id, f in await newest_first(client, stream):
        rec = _record(tenant, entry_id, f)
        if (provider is None or rec.provider == provider) and (model is None or rec.model == model):
            if offset <= total < offset + limit:
                page.append(rec)
            total += 1
    return page, total


async def newest_first(client: aioredis.Redis, stream: str) -> Iterable[tuple[str, dict[str, str]]]:
    """Every entry of a (bounded) stream, newest first, read in chunks."""
    out: list[tuple[str, dict[str, str]]] = []
    upper = "+"
    while True:
        # The client decodes responses (decode_responses=True): ids and fields are str.
        chunk: list[tuple[str, dict[str, str]]] = await client.xrevrange(  # type: ignore[assignment]
            stream, max=upper, min="-", count=_SCAN_CHUNK
        )
        out.extend(chunk)
        if len(chunk) < _SCAN_CHUNK:
            return out
        upper = "(" + chunk[-1][0]
