"""Threshold alerts: what the charging scripts wrote, as the API and the webhooks show it.

settle.lua and record.lua append one entry to the tenant's alerts stream (keys
`bs:{T}:alerts`) the first time a counter's settled spend crosses one of its budget's
thresholds: fields `cid`, `t` (threshold, percent), `l` (limit, micro-USD), `u` (spend
after the charge, micro-USD), `at` (Unix ms). Detection happens in the script, so a
threshold alerts once per budget, entity, period window and threshold however many
concurrent calls cross it; the stream is capped near ALERTS_MAX entries (lua/_lib.lua).

A forecast alert (a budget with `forecast_alert: true`) is an entry of kind `k` = `f`,
written the first time in a period that a charge leaves the counter's forecast at or past
its limit (lua/_lib.lua check_forecast): `cid`, `l`, `u` (spend), `h` (held), `w` (the
recent-spend window), `s`/`e` (the period window, Unix ms), `at`. The figures are the
forecast's inputs, so the alert's forecast and exhaustion time are sidecar.forecast's, the
same arithmetic the script decided with.

An alert's id is stable (`<tenant>/<counter id>/<threshold>`, escaped): a webhook receiver
can deduplicate on it across retries, replicas and tenants.
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
FORECAST_TYPE = "forecast"


class Alert(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One alert, in the AxonFlow SDK's BudgetAlert shape plus the entity and tenant."""

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
    # Forecast alerts only: the projection at the charge that raised it (threshold alerts
    # leave both out: their body is unchanged).
    forecast_usd: float | None = None
    exhausted_at: str | None = None


def parse_entry(
    tenant: str,
    fields: Mapping[str, str],
    name_of: Callable[[str], str | None],
) -> Alert | None:
    """The Alert of one stream entry (None for an entry this version cannot read).
    `name_of` gives a budget's display name (None: the budget is gone)."""
    if fields.get("k") == "f":
        return _forecast_entry(tenant, fields, name_of)
    try:
        cid = fields["cid"]
        threshold = int(fields["t"])
        limit = int(fields["l"])
        spent = int(fields["u"])
        at = int(fields["at"])
        budget_id, entity, _window = keys.parse_counter_id(cid)
    except (KeyError, ValueError):
        return None
    name = name_of(budget_id) or budget_id
    percentage = round(spent * 100 / limit, 2) if limit > 0 else 0.0
    return Alert(
        id=f"{keys.escape(tenant)}/{cid}/{threshold}",
        budget_id=budget_id,
        alert_type=ALERT_TYPE,
        threshold=threshold,
        percentage_reached=percentage,
        amount_usd=micro_to_usd(spent),
        limit_usd=micro_to_usd(limit),
        message=f"Budget '{name}' {threshold}% reached ({entity})",
        created_at=iso(at),
        acknowledged=False,
        entity=entity,
        tenant_id=tenant,
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
    """A budget's alerts still in the stream, newest first."""
    out: list[Alert] = []
    for _entry_id, fields in await newest_first(client, keys.tenant_keys(tenant).alerts):
        alert = parse_entry(tenant, fields, name_of)
        if alert is not None and alert.budget_id == budget_id:
            out.append(alert)
    return out
