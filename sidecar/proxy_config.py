"""The `proxy` section of the config file: how the /ext_authz route (Envoy ext_authz,
nginx auth_request, forward auth) reads identity and estimates from request headers."""

from __future__ import annotations

from msgspec import Struct


class ProxySpec(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Filled in by the proxy hook (issue 5)."""
