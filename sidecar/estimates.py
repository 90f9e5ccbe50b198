"""Pricing use: what a call is estimated to cost, what a downgrade re-prices it to, and
how settle is told to charge.

Model names resolve to prices in sidecar/pricing.py; this module applies them to the
figures a request gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.errors import RequestError
from sidecar.model import Price, UnpricedModel
from sidecar.money import charge_to_micro, cost_micro
from sidecar.resolution import Resolved, Snapshot
from sidecar.schemas import AuthorizeRequest, CheckRequest

# settle's cost argument for "charge the held estimate" (an unpriced model).
CHARGE_ESTIMATE = -1


def price(snap: Snapshot, provider: str | None, model: str | None) -> Price | None:
    """The price of a model in `snap`, the fallback price, or None (unpriced)."""
    if model is None:
        return None
    found = snap.prices.find(provider, model)
    if found is None and snap.config.settings.unpriced_model is UnpricedModel.FALLBACK:
        return snap.config.settings.fallback_price
    return None if found is None else found[0]


def priced(
    snap: Snapshot, provider: str | None, model: str | None, usd: float | None = None
) -> Price | None:
    """The model's price; a model with none is refused unless the call names its dollar
    amount (`usd`: then no price is needed, and a settle by tokens alone is refused)."""
    found = price(snap, provider, model)
    if found is None and model is not None and usd is None:
        raise RequestError(
            "model",
            f"no price for {provider or '*'}/{model}: add it to pricing, or set "
            "settings.unpriced_model to fallback",
        )
    return found


def estimate(
    price: Price | None,
    usd: float | None,
    tokens_in: int | None,
    tokens_out: int | None,
) -> int:
    """micro-USD: the dollar figure if given, else the tokens at the price (0: unpriced)."""
    if usd is not None:
        return charge_to_micro(usd)
    if price is None:
        return 0
    return cost_micro(tokens_in or 0, price.input_pico) + cost_micro(
        tokens_out or 0, price.output_pico
    )


def downgrade(
    snap: Snapshot,
    resolved: Resolved,
    req: AuthorizeRequest | CheckRequest,
    price_of_call: Price | None,
    est: int,
) -> tuple[Price | None, int | None]:
    """The price of the model a downgrade budget falls back to, and the estimate
    re-priced for it (None: it cannot be re-priced, so the downgrade budget blocks).

    Tokens are priced at the cheaper model's price; a dollar estimate is scaled by the
    ratio of the two models' per-token prices (input + output), rounded up.
    """
    target = resolved.downgrade_model
    if target is None:
        return None, None
    down = price(snap, req.provider, target)
    if down is None:
        return None, None
    floor = snap.config.settings.min_estimate_micro
    if req.estimated_tokens_in is not None or req.estimated_tokens_out is not None:
        cost = estimate(down, None, req.estimated_tokens_in, req.estimated_tokens_out)
        return down, max(cost, floor)
    if price_of_call is None or price_of_call.input_pico + price_of_call.output_pico <= 0:
        return down, None
    per_token, per_token_down = (
        price_of_call.input_pico + price_of_call.output_pico,
        down.input_pico + down.output_pico,
    )
    scaled = -(-est * per_token_down // per_token)  # rounded up
    return down, max(min(scaled, est), floor)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a settle says of a finished call.

    `cost_micro`: the cost to charge; None: price `tokens` as the reservation was priced;
    CHARGE_ESTIMATE: charge the held estimate. `priced_here`: the cost is `tokens` priced
    by the sidecar, not the caller's figure. Tokens given with a cost are recorded and
    correct the token limiters. `provider_model` replaces the reservation's in its usage
    record (the gateway's audit names the model only after the call)."""

    cost_micro: int | None
    tokens: tuple[int, int] | None
    latency_ms: int | None
    success: bool
    provider_model: tuple[str, str] | None = None
    priced_here: bool = False

    @property
    def mode(self) -> str:
        """settle.lua's ARGV[4]: price the tokens ('t'), charge the estimate ('e'), or
        charge a cost given by the caller ('c') or priced from tokens by the sidecar ('p')."""
        if self.cost_micro is None:
            return "t"
        if self.cost_micro == CHARGE_ESTIMATE:
            return "e"
        return "p" if self.priced_here else "c"
