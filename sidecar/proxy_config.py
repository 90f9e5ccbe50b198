"""The `proxy` section of the config file: how the /ext_authz route (Envoy ext_authz,
nginx auth_request, forward auth) reads identity and estimates from request headers.

```yaml
proxy:
  headers: {org_id: x-org-id, model: x-model, estimate_usd: x-budget-estimate-usd, ...}
  default_estimate_usd: 0.01   # held when neither the request nor its route gives one
  lease_ms: 60000              # leave out for settings.default_lease_ms
  deny_status: 429             # or 403
  routes:                      # defaults by the original path; the longest prefix wins
    - prefix: /v1/chat/completions
      defaults: {provider: openai, model: gpt-4o, estimated_usd: 0.05}
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
    # USD to hold for this request; optional (route default, then default_estimate_usd).
    estimate_usd: HeaderName = "x-budget-estimate-usd"
    # Becomes the authorize idempotency_key: a retried check holds once.
    request_id: HeaderName = "x-request-id"
    # Where forward-auth proxies put the client's path; the first one present wins.
    # Envoy needs none: it appends the original path to /ext_authz.
    original_uri: tuple[HeaderName, ...] = ("x-original-uri", "x-forwarded-uri")

    def __post_init__(self) -> None:
        # Two fields read from one header would silently share a value.
        used: dict[str, str] = {}
        for attr in self.__struct_fields__:
            value = getattr(self, attr)
            for name in value if isinstance(value, tuple) else (value,):
                if name in used:
                    raise ValueError(f"{attr}: header {name!r} is already used by {used[name]}")
                used[name] = attr


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
    defaults: RouteDefaults = msgspec.field(default_factory=RouteDefaults)


class ProxySpec(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How /ext_authz turns a proxied request into an authorize."""

    headers: ProxyHeaders = msgspec.field(default_factory=ProxyHeaders)
    default_estimate_usd: Usd = 0.01
    lease_ms: LeaseMs | None = None
    # Envoy passes any non-200 through to the client; nginx needs its error_page mapping
    # for 429 (deploy/nginx/nginx.conf) and answers 403 natively.
    deny_status: Literal[429, 403] = 429
    routes: tuple[ProxyRoute, ...] = ()

    def __post_init__(self) -> None:
        prefixes = [r.prefix for r in self.routes]
        for i, prefix in enumerate(prefixes):
            if prefix in prefixes[:i]:
                raise ValueError(f"routes: duplicate prefix {prefix!r} (routes[{i}])")

    def route(self, path: str) -> RouteDefaults | None:
        """The defaults of the longest route prefix that `path` starts with."""
        best: ProxyRoute | None = None
        for r in self.routes:
            if path.startswith(r.prefix) and (best is None or len(r.prefix) > len(best.prefix)):
                best = r
        return best.defaults if best is not None else None
