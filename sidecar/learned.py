"""Learned estimates (issue 19): what a call holds when its caller gives no estimate, or a
smaller one than its calls are known to cost.

A concurrent runaway loop overshoots a block budget by the estimate error of the calls in
flight (invariant 1): holds of $0.01 for calls that cost $0.015 let 5 calls through a $0.05
cap and charge $0.075. With `estimate: learned` the hold is instead the p95 of the recent
settled costs of the same tenant, model and agent (a *series*), capped by
`settings.estimate_ceiling_usd`, once the series was taught `settings.estimate_min_count`
costs; until then (cold start) the caller's or the configured figure holds, as with
`fixed`.

Where the figures live and move (all inside the scripts, no extra round trip):
- bs:{T}:est (sidecar/keys.py), one field per series: "count:p95:c1,c2,...:t1.t2", the
  last LEARN_RING settled costs, their p95 and their two largest (what keeps the p95 up to
  date without reading the ring), so each replica holds the same learned figure;
- settle.lua teaches the series the reservation was made for (record field 24) a cost that
  was measured: priced tokens or a given cost. A charge of the held estimate (an unpriced
  model, a hold charged at its lease's end) teaches nothing, or the estimator would learn
  its own guesses;
- authorize.lua and check.lua read the series' p95 and hold it where it is larger.

This module decides, per call, whether the estimate is learned, builds the scripts'
arguments, and says which estimate a decision held and why (`estimate_source`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sidecar.model import Budget, Config, EstimateMode, Settings
from sidecar.schemas import EstimateSource

__all__ = ["EstimateSource"]  # defined with the Decision that carries it

# The costs a series keeps (lua/_lib.lua LEARN_RING): its p95 by nearest rank is then the
# second largest, so one outlier in 32 calls does not set the hold.
LEARN_RING = 32


@dataclass(frozen=True, slots=True)
class EstimateHint:
    """What a surface knows of a request's estimate that the request itself does not say:
    `default` its estimated_usd is a configured default, not the caller's; `mode` the
    estimate mode of its proxy route (None: the budgets and settings decide)."""

    default: bool = False
    mode: str | None = None


NO_HINT = EstimateHint()
# authorize.lua's ARGV[20..22] and check.lua's ARGV[8..10] for a fixed estimate.
FIXED_ARGS: tuple[str, str, str] = ("", "", "")


def mode_of(
    settings_mode: EstimateMode, budgets: Iterable[Budget], route_mode: str | None = None
) -> EstimateMode:
    """The estimate mode of one call: its proxy route's if the route names one; else
    `learned` if any budget that applies says so, `fixed` if the budgets that say anything
    say fixed; else the settings'. Any one budget asking for learned wins over another's
    fixed: the larger hold is the one that keeps both caps."""
    if route_mode is not None:
        return EstimateMode(route_mode)
    named = None
    for b in budgets:
        if b.estimate is EstimateMode.LEARNED:
            return EstimateMode.LEARNED
        if b.estimate is not None:
            named = b.estimate
    return named if named is not None else settings_mode


def anywhere(config: Config) -> bool:
    """Whether any call may learn under this config file (settle then names the
    statistics' key; a fixed-only config names no key it never writes). API budgets carry
    no estimate mode."""
    return (
        config.settings.estimate is EstimateMode.LEARNED
        or any(b.estimate is EstimateMode.LEARNED for b in config.budgets)
        or any(r.estimate == "learned" for r in config.proxy.routes)
    )


def script_args(settings: Settings, series: str) -> tuple[str, int, int] | tuple[str, str, str]:
    """The three learned-estimate arguments of authorize.lua and check.lua: the series,
    the ceiling (micro-USD), the minimum count ('' series: fixed)."""
    if not series:
        return FIXED_ARGS
    return (series, settings.estimate_ceiling_micro, settings.estimate_min_count)


def settle_config(settings: Settings) -> str:
    """settle.lua's ARGV[13]: "ttl_s:max_series"."""
    return f"{settings.estimate_stats_days * 86_400}:{settings.estimate_max_series}"


def source_of(asked: int, floor: int, sent: int, weighed: int, default: bool) -> EstimateSource:
    """Which estimate a decision held: `asked` what the request's figures come to, `sent`
    what the sidecar passed the script (asked, at least the floor), `weighed` what the
    script weighed the budgets against (larger than sent only when it held the learned
    figure), `default` whether the asked figure is a configured default."""
    if weighed > sent:
        return EstimateSource.LEARNED
    if asked < floor:
        return EstimateSource.FLOOR
    return EstimateSource.DEFAULT if default else EstimateSource.CALLER


@dataclass(frozen=True, slots=True)
class SeriesStats:
    """One series as stored: costs ever taught, the cached p95, the ring (micro-USD)."""

    count: int
    p95: int
    ring: tuple[int, ...]


def parse_series(value: str) -> SeriesStats:
    """A series as settle.lua writes it; one written before the ring's two largest were
    kept after it (no fourth part) reads the same."""
    count, p95_text, rest = value.split(":", 2)
    ring = rest.partition(":")[0]
    return SeriesStats(int(count), int(p95_text), tuple(int(c) for c in ring.split(",") if c))


def p95(costs: Sequence[int]) -> int:
    """The nearest-rank 95th percentile: the ceil(0.95 n)-th smallest (the Lua's twin)."""
    ranked = sorted(costs)
    return ranked[-(-95 * len(ranked) // 100) - 1]
