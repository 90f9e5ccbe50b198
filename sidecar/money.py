"""Exact money: every amount in Redis is an integer of micro-USD (invariant 4).

Floats only exist at the JSON edge; they are converted once, through Decimal, so that
0.1 + 0.2 style drift never reaches a counter.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

MICRO = 1_000_000
# Prices are kept as pico-USD per token (= nano-USD per 1k tokens): fine enough for the
# cheapest models ($0.0000375 per 1k) and still an exact integer in Lua's doubles.
PICO_PER_USD_PER_1K = 1_000_000_000


def usd_to_micro(usd: float | int | str | Decimal) -> int:
    """USD (as sent in JSON or YAML) to integer micro-USD, rounding half up."""
    return int((Decimal(str(usd)) * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# A charge is read to the nano-USD before it is rounded up: a double's shortest repr
# carries noise below that (0.1 + 0.2 = 0.30000000000000004; 999999.9 + ulp), which must
# not cost a micro-USD, while a real fraction of a micro-USD must not be lost.
_NANO = Decimal("0.001")


def charge_to_micro(usd: float | int | str | Decimal) -> int:
    """A cost or an estimate in USD to integer micro-USD, rounded UP like a cost priced
    from tokens (cost_micro): $0.0000004 of spend is charged one micro-USD, never $0, and
    a hold is never below what was asked. Limits keep usd_to_micro (rounding a cap up
    would raise it)."""
    nano = (Decimal(str(usd)) * MICRO).quantize(_NANO, rounding=ROUND_HALF_UP)
    return int(nano.to_integral_value(rounding=ROUND_CEILING))


def micro_to_usd(micro: int) -> float:
    """Micro-USD to the float the JSON surfaces carry (exact for 6 decimals)."""
    return micro / MICRO


def price_to_pico(usd_per_1k: float | int | str | Decimal) -> int:
    """USD per 1k tokens to integer pico-USD per token."""
    value = Decimal(str(usd_per_1k)) * PICO_PER_USD_PER_1K
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def pico_to_price(pico: int) -> float:
    return pico / PICO_PER_USD_PER_1K


def cost_micro(tokens: int, pico_per_token: int) -> int:
    """Cost of `tokens` at a price, rounded up to the next micro-USD (never under-charge).

    lua/_lib.lua computes the same function; tests pin that both agree.
    """
    return -(-tokens * pico_per_token // MICRO)
