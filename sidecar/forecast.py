"""Forecasts: a budget counter's projected spend at its period's end, and when that
projection reaches the limit. Pure arithmetic in integer micro-USD and whole seconds; no
I/O, the clock is an argument.

What it reads, all kept by the charging scripts in O(1) per charge (lua/_lib.lua
window_next): the counter's settled and held amounts, and its recent-spend window, the
field "w:<cid>" = "k:cur:prev": k is the index of the current bucket of WINDOW_S seconds
(Unix seconds // WINDOW_S), cur what was charged in bucket k, prev in bucket k - 1.

The estimator (README, "Forecasts"):

    recent  R = cur + prev * (WINDOW_S - e) / WINDOW_S    spend of the last WINDOW_S
            (a sliding window over two buckets; e = seconds into the current bucket)
    period  P = used * WINDOW_S / max(elapsed, WINDOW_S)  the period's average, per
            WINDOW_S (never over less than one window: one early call is not a trend)
    rate      = (R + P) / 2 per WINDOW_S                  the blend
    forecast  = used + held + rate * remaining / WINDOW_S
    exhausted_at = now + (limit - used - held) / rate, when that is before the period
            ends (null otherwise); now when used + held already reach the limit

Each division rounds down (the exhaustion time rounds up to a whole second), in this
order, so Lua (lua/_lib.lua forecast_reaches, which decides the forecast alert) and
Python agree to the micro-USD: every step is floor(a * b / c) with the remainder's product
below 2^53, so Lua's doubles compute it exactly (see _lib.lua muldiv).
"""

from __future__ import annotations

from typing import NamedTuple

# The recent window's bucket, in seconds: two buckets make the sliding window, so a burst
# shows in the forecast from its first charge and is forgotten 2 * WINDOW_S after it ends.
WINDOW_S = 600


class Forecast(NamedTuple):
    forecast_micro: int
    # Unix ms (a whole second) when the projection reaches the limit; None: not this period.
    exhausted_at_ms: int | None


def parse_window(raw: str | bytes | None) -> tuple[int, int, int]:
    """(bucket index, current bucket's spend, previous bucket's spend) of a "w:" field;
    an absent or unreadable field is an empty window."""
    if raw is None or raw == "" or raw == b"":
        return (0, 0, 0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        k, cur, prev = text.split(":")
        return (int(k), int(cur), int(prev))
    except ValueError:
        return (0, 0, 0)


def forecast(
    used: int,
    held: int,
    limit: int,
    window: tuple[int, int, int],
    start_ms: int,
    end_ms: int,
    now_ms: int,
) -> Forecast:
    """The forecast of one counter (micro-USD; times Unix ms) at `now_ms`.

    One function, not three (recent spend, rate, projection): it runs for every dollar
    budget of every decision, and the two calls were a fifth of its cost (callgrind).
    """
    now_s = now_ms // 1000
    remaining = end_ms // 1000 - now_s
    if remaining < 0:
        remaining = 0
    # R, the recent spend: the two buckets as a window sliding over the last WINDOW_S.
    k, cur, prev = window
    k_now = now_s // WINDOW_S
    if k >= k_now:  # this bucket (or a writer whose clock is ahead: take its figures)
        recent = cur + prev * (WINDOW_S - now_s + k_now * WINDOW_S) // WINDOW_S
    elif k == k_now - 1:  # the field's current bucket is now the previous one
        recent = cur * (WINDOW_S - now_s + k_now * WINDOW_S) // WINDOW_S
    else:
        recent = 0
    # P, the period's average per WINDOW_S, never over less than one window (one early
    # call is not a trend); v2 = R + P is twice the blended rate, so that the halving
    # rounds once, at the projection.
    elapsed = now_s - start_ms // 1000
    v2 = recent + used * WINDOW_S // (elapsed if elapsed > WINDOW_S else WINDOW_S)
    committed = used + held
    projected = committed + v2 * remaining // (2 * WINDOW_S)
    need = limit - committed
    if need <= 0:
        return Forecast(projected, now_s * 1000)
    if v2 <= 0:
        return Forecast(projected, None)
    seconds = -(-need * 2 * WINDOW_S // v2)  # rounded up: the first second it is reached
    if seconds > remaining:
        return Forecast(projected, None)
    return Forecast(projected, (now_s + seconds) * 1000)
