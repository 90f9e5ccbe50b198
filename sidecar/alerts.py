"""Threshold alerts: what the charging scripts wrote, as the API and the webhooks show it.

settle.lua and record.lua append one entry to the tenant's alerts stream (keys
`bs:{T}:alerts`) the first time a counter's settled spend crosses one of its budget's
thresholds (or, after a reload lowered the limit under it, at the next charge): fields
`cid`, `t` (threshold, percent), `l` (limit, micro-USD), `u` (spend after the charge,
micro-USD), `at` (Unix ms). A denied authorize also alerts the thresholds its budgets'
settled plus held spend has passed and not alerted yet (a limit lowered under the spend,
a budget filled by holds: no charge follows a denial, so they would never alert); its
entries add `h` (held micro-USD, `u` then the settled part). Detection happens in the
script, so a
threshold alerts once per budget, entity, period window and threshold however many
concurrent calls cross it; the stream is capped near ALERTS_MAX entries (lua/_lib.lua).

Guard trips share the stream: an entry with a `k` field was written by the script whose
guard tripped (k: `stop` a stop made, `loop` a loop guard, `calls` a call cap, `velocity`
a spend-velocity limit; `lost` Redis lost the tenant's state, sidecar.state_loss), with
`g` the guard's id (stop, loop guard, budget, rate limit),
`s` the scope, `e` the entity (escaped), `r` the reason or detail, `at` (Unix ms) and, for
a stop, `x` when it ends (Unix ms, 0 never). They read as the same Alert, `alert_type`
naming the guard (GUARD_TYPES) and `budget_id` the guard's id.

An alert's id is stable (`<tenant>/<counter id>/<threshold>` for a threshold, and
`<tenant>/<k>/<g>/<entity>/<at>` for a guard trip, escaped): a webhook receiver can
deduplicate on it across retries, replicas and tenants (a forecast alert's:
`<tenant>/<counter id>/forecast`).

A forecast alert (a budget with `forecast_alert: true`) is an entry of kind `k` = `f`,
written the first time in a period that a charge leaves the counter's forecast at or past
its limit (lua/_lib.lua check_forecast): `cid`, `l`, `u` (spend), `h` (held), `w` (the
recent-spend window), `s`/`e` (the period window, Unix ms), `at`. The figures are the
forecast's inputs, so the alert's forecast and exhaustion time are sidecar.forecast's, the
same arithmetic the script decided with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec
import redis.asyncio as aioredis

from sidecar import keys
from sidecar.forecast import forecast, parse_window
from sidecar.ledger import newest_first
from sidecar.money import micro_to_usd
from sidecar.periods import iso

ALERT_TYPE = "threshold_reached"
# A guard trip's kind (stream field `k`) -> its alert_type.
GUARD_TYPES = {
    "stop": "stop",
    "loop": "loop_detected",
    "calls": "call_limit",
    # A period-total (per-run) budget's dollar cap denied a call.
    "cap": "run_cap",
    "velocity": "velocity",
    # Redis lost the tenant's state (sidecar.state_loss): g the store's new marker id.
    "lost": "store_state_lost",
}
_GUARD_WORDS = {
    "stop": "Stop",
    "loop": "Loop guard",
    "calls": "Call limit of budget",
    "cap": "Cap of budget",
    "velocity": "Velocity limit",
    "lost": "Budget store",
}


FORECAST_TYPE = "forecast"
# What a budget's own alert route lists: its thresholds, forecast and caps (another
# guard whose id happens to be a budget's is not that budget's).
_BUDGET_TYPES = (ALERT_TYPE, FORECAST_TYPE, GUARD_TYPES["calls"], GUARD_TYPES["cap"])


class Alert(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One alert, in the AxonFlow SDK's BudgetAlert shape plus the entity and tenant; a
    guard trip also carries its scope and reason (a stop: when it ends), a forecast alert
    its projection."""

    id: str
    budget_id: str
    alert_type: str
    threshold: int
    percentage_reached: float
    amount_usd: float
    limit_usd: float
    message: str
    created_at: str
    acknowledged: bool
    entity: str
    tenant_id: str
    scope: str | None = None
    reason: str | None = None
    expires_at: str | None = None
    # Forecast alerts only: the projection at the charge that raised it (threshold alerts
    # leave both out: their body is unchanged).
    forecast_usd: float | None = None
    exhausted_at: str | None = None
    # A threshold alert raised by a denied call: the part of amount_usd still held (0.0
    # when the spend alone passed it; a charge's alerts leave it out).
    held_usd: float | None = None


def parse_entry(
    tenant: str,
    fields: Mapping[str, str],
    name_of: Callable[[str], str | None],
) -> Alert | None:
    """The Alert of one stream entry (None for an entry this version cannot read).
    `name_of` gives a budget's display name (None: the budget is gone)."""
    if fields.get("k") == "f":
        return _forecast_entry(tenant, fields, name_of)
    if "k" in fields:
        return _guard_entry(tenant, fields, name_of)
    try:
        cid = fields["cid"]
        threshold = int(fields["t"])
        limit = int(fields["l"])
        spent = int(fields["u"])
        held = int(fields["h"]) if "h" in fields else None
        at = int(fields["at"])
        budget_id, entity, _window = keys.parse_counter_id(cid)
    except (KeyError, ValueError):
        return None
    name = name_of(budget_id) or budget_id
    committed = spent + (held or 0)
    percentage = round(committed * 100 / limit, 2) if limit > 0 else 0.0
    of_it = f", {micro_to_usd(held)} USD of it held" if held else ""
    return Alert(
        id=f"{keys.escape(tenant)}/{cid}/{threshold}",
        budget_id=budget_id,
        alert_type=ALERT_TYPE,
        threshold=threshold,
        percentage_reached=percentage,
        amount_usd=micro_to_usd(committed),
        limit_usd=micro_to_usd(limit),
        message=f"Budget '{name}' {threshold}% reached ({entity}{of_it})",
        created_at=iso(at),
        acknowledged=False,
        entity=entity,
        tenant_id=tenant,
        held_usd=None if held is None else micro_to_usd(held),
    )


def _guard_entry(
    tenant: str, fields: Mapping[str, str], name_of: Callable[[str], str | None]
) -> Alert | None:
    """The Alert of a guard trip (see the module's docstring)."""
    kind = fields["k"]
    alert_type = GUARD_TYPES.get(kind)
    try:
        guard, scope, raw_entity, at = fields["g"], fields["s"], fields["e"], int(fields["at"])
        expires = int(fields.get("x") or 0)
    except (KeyError, ValueError):
        return None
    if alert_type is None:
        return None
    reason = fields.get("r", "")
    entity = keys.unescape(raw_entity)
    named = name_of(guard) if kind in ("calls", "cap") else None
    what = f"{_GUARD_WORDS[kind]} '{named or guard}'"
    # A budget's or a rate limit's trip names no scope: its id says what it covers.
    on = f"{scope} {entity}" if scope else entity
    message = f"{what} on {on}" + (f": {reason}" if reason else "")
    if kind == "lost":
        message = reason  # it says what was lost and what was put back
    parts = (keys.escape(tenant), kind, keys.escape(guard), raw_entity)
    return Alert(
        # A loss's id is its marker's: every replica that notices one loss appends an
        # entry, and receivers deduplicate on the id (their clocks differ); a trip's own
        # instant tells its trips apart.
        id="/".join(parts if kind == "lost" else (*parts, str(at))),
        budget_id=guard,
        alert_type=alert_type,
        threshold=0,
        percentage_reached=0.0,
        amount_usd=0.0,
        limit_usd=0.0,
        message=message,
        created_at=iso(at),
        acknowledged=False,
        entity=entity,
        tenant_id=tenant,
        scope=scope,
        reason=reason,
        expires_at=iso(expires) if expires else None,
    )


def _forecast_entry(
    tenant: str,
    fields: Mapping[str, str],
    name_of: Callable[[str], str | None],
) -> Alert | None:
    try:
        cid = fields["cid"]
        limit, spent, held = int(fields["l"]), int(fields["u"]), int(fields["h"])
        start, end, at = int(fields["s"]), int(fields["e"]), int(fields["at"])
        window = parse_window(fields["w"])
        budget_id, entity, _window = keys.parse_counter_id(cid)
    except (KeyError, ValueError):
        return None
    f = forecast(spent, held, limit, window, start, end, at)
    name = name_of(budget_id) or budget_id
    when = iso(f.exhausted_at_ms) if f.exhausted_at_ms is not None else iso(end)
    return Alert(
        id=f"{keys.escape(tenant)}/{cid}/forecast",
        budget_id=budget_id,
        alert_type=FORECAST_TYPE,
        threshold=100,
        percentage_reached=round(spent * 100 / limit, 2) if limit > 0 else 0.0,
        amount_usd=micro_to_usd(spent),
        limit_usd=micro_to_usd(limit),
        message=(
            f"Budget '{name}' forecast to run out at {when}: "
            f"{micro_to_usd(f.forecast_micro)} USD projected by {iso(end)} ({entity})"
        ),
        created_at=iso(at),
        acknowledged=False,
        entity=entity,
        tenant_id=tenant,
        forecast_usd=micro_to_usd(f.forecast_micro),
        exhausted_at=None if f.exhausted_at_ms is None else iso(f.exhausted_at_ms),
    )


async def read_alerts(
    client: aioredis.Redis,
    tenant: str,
    budget_id: str,
    name_of: Callable[[str], str | None],
) -> list[Alert]:
    """A budget's alerts still in the stream, newest first: its thresholds and the trips
    of its call cap (other guards' ids are not budget ids: they are left out)."""
    out: list[Alert] = []
    for _entry_id, fields in await newest_first(client, keys.tenant_keys(tenant).alerts):
        alert = parse_entry(tenant, fields, name_of)
        if alert is not None and alert.budget_id == budget_id and alert.alert_type in _BUDGET_TYPES:
            out.append(alert)
    return out


async def recent_alerts(
    client: aioredis.Redis, tenant: str, limit: int, name_of: Callable[[str], str | None]
) -> list[Alert]:
    """The tenant's newest `limit` alerts, every kind, newest first (entries this version
    cannot read are passed over)."""
    stream = keys.tenant_keys(tenant).alerts
    out: list[Alert] = []
    upper = "+"
    while len(out) < limit:
        want = limit - len(out)
        # The client decodes responses (decode_responses=True): ids and fields are str.
        chunk: list[tuple[str, dict[str, str]]] = await client.xrevrange(  # type: ignore[assignment]
            stream, max=upper, min="-", count=want
        )
        for _id, fields in chunk:
            alert = parse_entry(tenant, fields, name_of)
            if alert is not None:
                out.append(alert)
        if len(chunk) < want:
            return out  # the stream's oldest entry read
        upper = "(" + chunk[-1][0]
    return out
