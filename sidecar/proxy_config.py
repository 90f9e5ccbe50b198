"""The `proxy` section of the config file: how the /ext_authz route (Envoy ext_authz,
nginx auth_request, forward auth) reads identity and estimates from request headers.

```yaml
proxy:
  headers: {org_id: x-org-id, model: x-model, estimate_usd: x-budget-estimate-usd, ...}
  trusted:                     # headers only the proxy sets (it overwrites a client's copy)
    uri_header: x-forwarded-uri      # default none: Envoy appends the path to /ext_authz
    method_header: x-forwarded-method  # default none: the check's own method (Envoy)
  default_estimate_usd: 0.01   # held when neither the request nor its route gives one
  lease_ms: 60000              # leave out for settings.default_lease_ms
  deny_status: 429             # or 403
  pass_methods: [OPTIONS]      # answered 200 with nothing held (CORS preflight)
  unsettled: charge            # or release: a hold nobody settled, at its lease end
  routes:                      # by the original path; the longest prefix wins
    - prefix: /v1/chat/completions
      defaults: {provider: openai, model: gpt-4o, estimated_usd: 0.05}
    - prefix: /v1/chat/completions
      methods: [GET]           # only for these methods: its own estimate
      defaults: {estimated_usd: 0.001}
    - prefix: /v1/models
      hold: false              # every method passes with nothing held
```

A header the request carries wins over its route's default. This module is imported by
sidecar.model, so it depends on sidecar.schemas only.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from sidecar.schemas import Id, LeaseMs, ModelName, Usd

# An HTTP field name (RFC 9110 token), spelled lower-case as Envoy and HTTP/2 carry it.
HeaderName = Annotated[str, Meta(pattern=r"^[a-z0-9!#$%&'*+.^_`|~\-]+\Z", max_length=100)]
# Matched against the original request path (query string removed).
PathPrefix = Annotated[str, Meta(pattern=r"^/[^\s?#]*\Z", max_length=1000)]
# What a hold still unsettled at its lease end becomes (AuthorizeRequest.on_expiry).
Unsettled = Literal["charge", "release"]
# An HTTP method as proxies send it (upper-case token).
Method = Annotated[str, Meta(pattern=r"^[A-Z]+\Z", max_length=20)]


class ProxyHeaders(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Which request header carries each field. Proxies must be told to forward them
    (Envoy: `allowed_headers`; nginx: `proxy_pass_request_headers`, on by default)."""

    org_id: HeaderName = "x-org-id"
    team_id: HeaderName = "x-team-id"
    agent_id: HeaderName = "x-agent-id"
    workflow_id: HeaderName = "x-workflow-id"
    user_id: HeaderName = "x-user-id"
    model: HeaderName = "x-model"
    provider: HeaderName = "x-provider"
    # The agent's run (per-run caps and loop guards of scope run).
    run_id: HeaderName = "x-run-id"
    # What the call asks, as a token or hash (loop guards): the same one again is a repeat.
    fingerprint: HeaderName = "x-budget-fingerprint"
    # USD to hold for this request; optional (route default, then default_estimate_usd).
    estimate_usd: HeaderName = "x-budget-estimate-usd"
    # Becomes the authorize idempotency_key: a retried check holds once. It must be an id
    # the proxy generates and overwrites (nginx $request_id, Caddy {http.request.uuid},
    # HAProxy unique-id); null where the proxy cannot (Traefik): a client-sent copy is then
    # ignored and each check holds on its own.
    request_id: HeaderName | None = "x-request-id"
    # Gone: a list of URI headers let a client's copy of the first one choose the route.
    original_uri: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.original_uri is not None:
            raise ValueError(
                "original_uri: replaced by proxy.trusted.uri_header, the one header your "
                "proxy sets itself"
            )
        _distinct(self, {})


def _distinct(struct: Struct, used: dict[str, str]) -> dict[str, str]:
    """Two fields read from one header would silently share a value."""
    for attr in struct.__struct_fields__:
        name = getattr(struct, attr)
        if name is None:
            continue
        if name in used:
            raise ValueError(f"{attr}: header {name!r} is already used by {used[name]}")
        used[name] = attr
    return used


class TrustedHeaders(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Headers that the proxy itself sets on every check, overwriting any client copy: the
    original URI and method. Per deployment, since each proxy owns different names. Left
    out (the default, right for Envoy), the original path is what follows /ext_authz and
    the method is the check's own; a client's X-Original-URI or X-Forwarded-Uri is never
    read. Set, the header is required: a check without it is a 400 (the proxy is not
    configured as the example says), never a guess from another header."""

    # nginx: x-original-uri; Traefik, Caddy, HAProxy (deploy/): x-forwarded-uri.
    uri_header: HeaderName | None = None
    # nginx: x-original-method; Traefik, Caddy, HAProxy (deploy/): x-forwarded-method.
    method_header: HeaderName | None = None


class RouteDefaults(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """What a route's requests are, unless their headers say otherwise."""

    org_id: Id | None = None
    team_id: Id | None = None
    agent_id: Id | None = None
    workflow_id: Id | None = None
    user_id: Id | None = None
    provider: Id | None = None
    model: ModelName | None = None
    estimated_usd: Usd | None = None


class ProxyRoute(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    prefix: PathPrefix
    # Only requests with one of these methods take this route; null: every method. A route
    # with methods wins over one without for the same prefix.
    methods: tuple[Method, ...] | None = None
    # false: every request of this route passes (200) with nothing held.
    hold: bool = True
    # Methods that pass with nothing held on this route; null: proxy.pass_methods.
    pass_methods: tuple[Method, ...] | None = None
    # A hold still unsettled when its lease ends; null: proxy.unsettled.
    unsettled: Unsettled | None = None
    # What this route's requests hold without an estimate header: "learned" the p95 of
    # recent settled costs (sidecar.learned), "fixed" the default; null: as the budgets
    # and settings say.
    estimate: Literal["fixed", "learned"] | None = None
    defaults: RouteDefaults = msgspec.field(default_factory=RouteDefaults)

    def passes(self, method: str, default: tuple[str, ...]) -> bool:
        allowed = self.pass_methods if self.pass_methods is not None else default
        return not self.hold or method in allowed


class ProxySpec(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How /ext_authz turns a proxied request into an authorize."""

    headers: ProxyHeaders = msgspec.field(default_factory=ProxyHeaders)
    trusted: TrustedHeaders = msgspec.field(default_factory=TrustedHeaders)
    default_estimate_usd: Usd = 0.01
    lease_ms: LeaseMs | None = None
    # Envoy passes any non-200 through to the client; nginx needs its error_page mapping
    # for 429 (deploy/nginx/nginx.conf) and answers 403 natively.
    deny_status: Literal[429, 403] = 429
    # Methods that pass (200) with nothing held where no route says otherwise: a CORS
    # preflight is not a model call.
    pass_methods: tuple[Method, ...] = ("OPTIONS",)
    # A hold still unsettled when its lease ends (a route may say otherwise): "charge"
    # charges its estimate as spent, since behind a proxy that forwards to the provider
    # nobody settles and the call went through; "release" gives it back (the application
    # settles every call itself, late settles included).
    unsettled: Unsettled = "charge"
    routes: tuple[ProxyRoute, ...] = ()

    def __post_init__(self) -> None:
        # One prefix may have one route for every method and others for listed methods, but
        # no method may find two routes of one prefix.
        seen: set[tuple[str, str | None]] = set()
        for i, r in enumerate(self.routes):
            keys = {(r.prefix, m) for m in (r.methods or (None,))}
            if keys & seen:
                raise ValueError(f"routes: duplicate prefix {r.prefix!r} (routes[{i}])")
            seen |= keys
        # The trusted headers are read as such: they must not also be an identity header.
        try:
            _distinct(self.trusted, _distinct(self.headers, {}))
        except ValueError as err:
            raise ValueError(f"trusted: {err}") from None

    def match(self, path: str, method: str) -> ProxyRoute | None:
        """The route of the longest prefix that `path` starts with and that takes `method`;
        of two with one prefix, the one that lists its methods."""
        best: ProxyRoute | None = None
        best_key = (-1, False)
        for r in self.routes:
            if not path.startswith(r.prefix):
                continue
            if r.methods is not None and method not in r.methods:
                continue
            key = (len(r.prefix), r.methods is not None)
            if key > best_key:
                best, best_key = r, key
        return best

    def route(self, path: str, method: str = "POST") -> RouteDefaults | None:
        """The defaults of the route `match` picks."""
        best = self.match(path, method)
        return best.defaults if best is not None else None

    def estimate_of(self, path: str, method: str) -> str | None:
        """The estimate mode this request's route names (None: it names none)."""
        best = self.match(path, method)
        return best.estimate if best is not None else None

    def unsettled_of(self, path: str, method: str) -> Unsettled:
        """What happens to this request's hold if its lease ends unsettled."""
        best = self.match(path, method)
        if best is not None and best.unsettled is not None:
            return best.unsettled
        return self.unsettled

    def passes(self, path: str, method: str) -> bool:
        """Whether this request passes with nothing held."""
        best = self.match(path, method)
        if best is None:
            return method in self.pass_methods
        return best.passes(method, self.pass_methods)
