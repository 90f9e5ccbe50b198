"""Model prices: the config file's and the API's over a bundled catalogue, and the rules
that turn the model name a client sends into the price it pays.

The catalogue is the price data of the `genai-prices` package (maintained by Pydantic,
bundled in its wheel, read offline; README "Prices" says why this source). It is read once
per process, the first time a snapshot is built, into plain dicts; a decision only does
dict lookups (memoized per name), never a library call or a file read.

Name resolution, in order, first the config/API prices over every candidate name, then
the catalogue over the same candidates:
  1. a provider prefix split off (`openai/gpt-4o` -> provider openai, model gpt-4o), when
     no provider was named or it names the same one (LiteLLM sends both);
  2. the name as sent, then lower-cased (`GPT-4o` -> `gpt-4o`);
  3. a dated snapshot cut to its family (`gpt-4o-2024-08-06`, `claude-x-20241022`,
     `gpt-4-0613` -> the name without the date), used only when the dated name has no
     price of its own.
A model name without a provider finds a price when exactly one config/API provider sells
it, else when the catalogue names its vendor (genai-prices' own vendor rules: `gpt-*` is
OpenAI's, `claude*` Anthropic's), else when one catalogue provider alone sells it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from typing import Any

from sidecar.model import Price

CONFIG = "config"
API = "api"
CATALOGUE = "genai-prices"

# A dated snapshot's suffix: -2024-08-06, -20241022, @20241022, or four digits (gpt-4-0613,
# mistral-small-2503).
_DATED = re.compile(r"[-@](?:\d{4}-\d{2}-\d{2}|20\d{6}|\d{4})\Z")
# "verified on 2026-10-14", "as of 2026-10-14": the dates the data says a price was checked.
_CHECKED = re.compile(r"(?:verified|as of|checked|updated)[^.]{0,20}?(\d{4}-\d{2}-\d{2})")
_MEMO_SIZE = 10_000
_PICO_PER_USD_PER_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Source:
    """Where a price came from: `config`, `api`, or the catalogue with its version and the
    newest date its data says a price was checked."""

    name: str
    version: str | None = None
    date: str | None = None


CONFIG_SOURCE = Source(CONFIG)
API_SOURCE = Source(API)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Bundled prices, indexed: (provider id, model id) -> price, and the aliases that lead
    to them."""

    source: Source
    prices: dict[tuple[str, str], Price]
    # (provider id, any name the data lists for a model) -> model id
    aliases: dict[tuple[str, str], str]
    # model name -> provider id, for a name sent without a provider
    home: dict[str, str]
    # provider names the data lists (ids, plus exact alternative names)
    providers: dict[str, str]
    # the data's own provider rules (`vertex_ai` contains `vertex` -> google), read by
    # matches() (not the library) once per unknown provider name, and remembered
    provider_rules: tuple[tuple[str, Any], ...] = ()
    # provider id -> (name prefix, model id): the data's `starts_with` rules, tried last
    prefixes: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # providers that resell others' models at the vendor's price (azure -> openai, ...)
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _provider_memo: dict[str, str | None] = field(default_factory=dict)

    def provider(self, name: str) -> str | None:
        name = name.lower()
        found = self.providers.get(name)
        if found is not None:
            return found
        if name in self._provider_memo:
            return self._provider_memo[name]
        found = next((pid for pid, rule in self.provider_rules if matches(rule, name)), None)
        if len(self._provider_memo) >= _MEMO_SIZE:
            self._provider_memo.clear()
        self._provider_memo[name] = found
        return found

    def find(self, provider: str | None, model: str) -> Price | None:
        """The catalogue price for one candidate name (already lower-cased)."""
        if provider is None:
            pid = self.home.get(model)
            if pid is None:
                return None
        else:
            pid = self.provider(provider) or provider
        for seller in (pid, *self.fallbacks.get(pid, ())):
            model_id = self.aliases.get((seller, model))
            if model_id is None:
                # The longest matching prefix: `gpt-4o-mini-` before `gpt-4o-`.
                model_id = next(
                    (m for prefix, m in self.prefixes.get(seller, ()) if model.startswith(prefix)),
                    None,
                )
            if model_id is not None:
                return self.prices.get((seller, model_id))
        return None


EMPTY_CATALOGUE = Catalogue(Source("none"), {}, {}, {}, {})


def _token_price(value: Any) -> Decimal | None:
    """USD per million tokens; a tiered price counts at its base tier (the prompt sizes
    most calls have: Gemini's >200k-token tier is not what an estimate should assume)."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    return base if isinstance(base, Decimal) else Decimal(str(base))


def _pico(per_mtok: Decimal | None) -> int:
    if per_mtok is None:
        return 0
    return int((per_mtok * _PICO_PER_USD_PER_MTOK).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _current(model: Any, today: date) -> Any:
    """The model's price today: the newest dated price that has started. Where a price
    also varies by time of day (DeepSeek's off-peak discount), the dearest of those counts:
    an estimate must not depend on the hour the sidecar started, and a cap errs high."""
    prices = model.prices
    if not isinstance(prices, list):
        return prices
    options = []
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if constraint is not None and hasattr(constraint, "start_time"):
            options.append(conditional.prices)
            continue
        start = getattr(constraint, "start_date", None)
        if start is None or start <= today:
            options.append(conditional.prices)
            break
    if not options:
        return prices[0].prices
    return max(options, key=_dearness)


def _dearness(price: Any) -> tuple[Decimal, Decimal]:
    return (
        _token_price(getattr(price, "input_mtok", None)) or Decimal(0),
        _token_price(getattr(price, "output_mtok", None)) or Decimal(0),
    )


def matches(clause: Any, name: str) -> bool:
    """genai-prices' match clause semantics (equals, starts_with, ends_with, contains,
    regex, or, and) over the clause's plain fields, so a decision never runs library code."""
    for attr, test in (
        ("equals", str.__eq__),
        ("starts_with", str.startswith),
        ("ends_with", str.endswith),
        ("contains", lambda text, part: part in text),
    ):
        value = getattr(clause, attr, None)
        if isinstance(value, str):
            return bool(test(name.lower(), value.lower()))
    regex = getattr(clause, "regex", None)
    if isinstance(regex, str):
        return re.search(regex, name) is not None
    either = getattr(clause, "or_", None)
    if either is not None:
        return any(matches(c, name) for c in either)
    both = getattr(clause, "and_", None)
    if both is not None:
        return all(matches(c, name) for c in both)
    return False


def _equals(match: Any) -> Iterator[str]:
    """Every exact name a genai-prices match clause lists (its `or` branches included)."""
    equals = getattr(match, "equals", None)
    if isinstance(equals, str):
        yield equals.lower()
    for branch in getattr(match, "or_", None) or ():
        yield from _equals(branch)


def _starts(match: Any) -> Iterator[str]:
    """Every name prefix a genai-prices match clause lists (its `or` branches included)."""
    starts = getattr(match, "starts_with", None)
    if isinstance(starts, str):
        yield starts.lower()
    for branch in getattr(match, "or_", None) or ():
        yield from _starts(branch)


def build_catalogue(providers: Iterable[Any], version: str | None, today: date) -> Catalogue:
    """Index genai-prices' provider list. A model with no token price, or priced at $0
    (subscription-included rows such as GitHub Copilot's), is left out: unpriced, never
    free."""
    prices: dict[tuple[str, str], Price] = {}
    aliases: dict[tuple[str, str], str] = {}
    sellers: dict[str, set[str]] = defaultdict(set)
    vendor_rules: list[tuple[str, Any]] = []
    provider_names: dict[str, str] = {}
    provider_rules: list[tuple[str, Any]] = []
    fallbacks: dict[str, tuple[str, ...]] = {}
    prefixes: dict[str, list[tuple[str, str]]] = defaultdict(list)
    checked: list[str] = []
    provider_list = list(providers)
    for p in provider_list:
        provider_names[p.id] = p.id
        if p.fallback_model_providers:
            fallbacks[p.id] = tuple(p.fallback_model_providers)
        if p.provider_match is not None:
            for name in _equals(p.provider_match):
                provider_names.setdefault(name, p.id)
            provider_rules.append((p.id, p.provider_match))
        if p.model_match is not None:
            vendor_rules.append((p.id, p.model_match))
        checked += _CHECKED.findall(p.price_comments or "")
        for m in p.models:
            checked += _CHECKED.findall(m.price_comments or "")
            current = _current(m, today)
            per_in = _token_price(getattr(current, "input_mtok", None))
            per_out = _token_price(getattr(current, "output_mtok", None))
            if not per_in and not per_out:
                continue
            model_id = m.id.lower()
            prices[(p.id, model_id)] = Price(p.id, model_id, _pico(per_in), _pico(per_out))
            for name in (model_id, *_equals(m.match)):
                aliases.setdefault((p.id, name), model_id)
                sellers[name].add(p.id)
            prefixes[p.id] += ((prefix, model_id) for prefix in _starts(m.match))
    home: dict[str, str] = {}
    for name, pids in sellers.items():
        vendor = next((pid for pid, rule in vendor_rules if rule.is_match(name)), None)
        if vendor in pids:
            home[name] = vendor
        elif len(pids) == 1:
            home[name] = next(iter(pids))
    today_iso = today.isoformat()
    dates = [d for d in checked if d <= today_iso]
    return Catalogue(
        source=Source(CATALOGUE, version, max(dates) if dates else None),
        prices=prices,
        aliases=aliases,
        home=home,
        providers=provider_names,
        provider_rules=tuple(provider_rules),
        fallbacks=fallbacks,
        prefixes={
            pid: tuple(sorted(rules, key=lambda r: -len(r[0]))) for pid, rules in prefixes.items()
        },
    )


@cache
def catalogue() -> Catalogue:
    """The bundled catalogue, built once per process. Without genai-prices installed the
    sidecar still runs, pricing only what the config and API name."""
    try:
        from importlib.metadata import version

        from genai_prices.data import providers
    except ImportError:  # pragma: no cover - genai-prices is a dependency
        return EMPTY_CATALOGUE
    return build_catalogue(providers, version("genai-prices"), datetime.now(UTC).date())


def _undated(model: str) -> str | None:
    cut = _DATED.sub("", model)
    return cut if cut != model else None


def candidates(provider: str | None, model: str) -> list[tuple[str | None, str]]:
    """The names to try for one request, most specific first (see the module docstring)."""
    lp, lm = (provider.lower() if provider else None), model.lower()
    found: list[tuple[str | None, str]] = [(provider, model), (lp, lm)]
    prefix, slash, rest = lm.partition("/")
    if slash and rest and (lp is None or lp == prefix):
        # First: `openai/gpt-4o` is OpenAI's gpt-4o, not a reseller's row of that name.
        found.insert(0, (prefix, rest))
    for p, m in list(found):
        undated = _undated(m)
        if undated is not None:
            found.append((p, undated))
    out: list[tuple[str | None, str]] = []
    for c in found:
        if c not in out:
            out.append(c)
    return out


@dataclass(frozen=True, slots=True)
class Prices:
    """Every price one snapshot knows: its own (config file and API, which override the
    catalogue) and the catalogue's."""

    own: dict[tuple[str, str], tuple[Price, Source]]
    catalogue: Catalogue
    _by_model: dict[str, tuple[Price, Source]] = field(default_factory=dict)
    _memo: dict[tuple[str | None, str], tuple[Price, Source] | None] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        pricing: Iterable[Price],
        api: Iterable[Price] = (),
        catalogue: Catalogue | None = None,
    ) -> Prices:
        api_keys = {(p.provider, p.model) for p in api}
        own: dict[tuple[str, str], tuple[Price, Source]] = {}
        for p in pricing:
            source = API_SOURCE if (p.provider, p.model) in api_keys else CONFIG_SOURCE
            own[(p.provider, p.model)] = (p, source)
        # Lower-cased too, so `GPT-4o` finds a price written `gpt-4o` (the exact name first).
        for (provider, model), entry in list(own.items()):
            own.setdefault((provider.lower(), model.lower()), entry)
        sellers: dict[str, list[tuple[Price, Source]]] = defaultdict(list)
        for (_provider, model), entry in own.items():
            if entry not in sellers[model]:
                sellers[model].append(entry)
        return cls(
            own=own,
            catalogue=catalogue if catalogue is not None else EMPTY_CATALOGUE,
            # A model name alone identifies an own price only when one provider sells it.
            _by_model={m: es[0] for m, es in sellers.items() if len(es) == 1},
        )

    def find(self, provider: str | None, model: str) -> tuple[Price, Source] | None:
        key = (provider, model)
        if key in self._memo:
            return self._memo[key]
        found = self._find(provider, model)
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = found
        return found

    def _find(self, provider: str | None, model: str) -> tuple[Price, Source] | None:
        names = candidates(provider, model)
        for p, m in names:
            own = self.own.get((p, m)) if p is not None else self._by_model.get(m)
            if own is not None:
                return own
        for p, m in names:
            price = self.catalogue.find(p, m.lower())
            if price is not None:
                return price, self.catalogue.source
        return None

    def entries(self) -> Iterator[tuple[Price, Source]]:
        """Own prices, then every catalogue price they do not override."""
        seen: set[tuple[str, str]] = set()
        for (provider, model), (price, source) in self.own.items():
            if (price.provider, price.model) == (provider, model):
                seen.add((provider.lower(), model.lower()))
                yield price, source
        for key, price in self.catalogue.prices.items():
            if key not in seen:
                yield price, self.catalogue.source
