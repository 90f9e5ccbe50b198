"""Requests that a web browser was tricked into sending, refused before credentials or any
body are read (api.app.guard calls `screen`, so the fast path and aiohttp apply it alike).
In open mode anyone who reaches the port is trusted, and a browser on the sidecar's host
reaches it from any page it shows.

1. Host (DNS rebinding). A page at `attacker.example:8787` whose name the attacker then
   points at 127.0.0.1 talks to the sidecar as its own origin: it reads every answer and
   sends any header. Its requests say `Host: attacker.example:8787`, which the browser
   writes and no page can change. So a Host is accepted only when public DNS cannot give it
   to an attacker, or the operator named it:
   - an IP address (127.0.0.1, [::1], a pod IP: kubelet probes and Prometheus scrapes use
     the pod IP), or a name without a dot (localhost, a Kubernetes Service or a Compose
     service, the `budget-sidecar` the shipped Envoy config names in its settle calls, the
     `budget_sidecar` upstream of the nginx example);
   - a name under .localhost (browsers resolve it to loopback themselves), .svc or
     .cluster.local (Kubernetes; neither is a public DNS name);
   - the address given to `serve --host`, and settings.allowed_hosts (exact names,
     `*.example.com` for the names under one, `*` for any Host: the check off).
   Anything else is 421 naming Host. The port is not part of the rule, except on
   /ext_authz: Envoy's check (and Caddy's forward_auth) carry the CLIENT's Host, the
   proxy's public name, so there a foreign name is accepted when its port is not the one
   the request came in on. A rebinding page cannot do that: to reach the sidecar its URL,
   and so its Host, names the sidecar's own port.

2. /ext_authz from another site. A page's `fetch(url, {mode: "no-cors"})`, `<img>` or form
   is sent without a CORS preflight, and /ext_authz takes its identity from the path (a
   route's defaults) and holds spend: a page could fill budgets and burn rate limits
   (never reading an answer). Proxies pass the client's headers on to the check, so a
   browser behind a proxy legitimately shows its Sec-Fetch-* and Origin there too; but then
   the check also carries headers the proxy adds (measured with the real ones: Envoy
   x-envoy-*, nginx X-Original-*, Traefik, Caddy and HAProxy X-Forwarded-*, Caddy Via),
   which a page cannot send to another origin without a preflight, and the sidecar answers
   no preflight with CORS permission. So a check with a browser's Sec-Fetch-Site,
   Sec-Fetch-Mode, Sec-Fetch-Dest or Origin and none of those (nor a `proxy.headers` or
   `proxy.trusted` name) is a browser talking to the sidecar directly: 403 naming the
   browser's header, nothing held.

What neither catches: a browser without Sec-Fetch-* (Safari before 16.4, Firefox before
90) sends a no-cors GET or an image with no Origin, indistinguishable from curl; and a TCP
forward onto another port (`kubectl port-forward 9000:8787`) lets a rebinding page's
/ext_authz checks through as a proxy's. Forward to the same port number.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from aiohttp import hdrs, web
from multidict import istr

from sidecar.api.problems import ProblemError
from sidecar.engine import Engine
from sidecar.model import Config
from sidecar.proxy_config import ProxySpec

EXT_AUTHZ = "/ext_authz"
# Names public DNS never answers for: the browser or the cluster resolves them.
_PRIVATE_SUFFIXES = (".localhost", ".svc", ".cluster.local")
# host[:port], the host a name, an IPv4 address or a bracketed IPv6 one (RFC 9110 §7.2).
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?")
# What a browser's own request carries (a page cannot set or remove any of them); istr,
# as aiohttp's own header names: a faster lookup in the request's headers.
_BROWSER = tuple(istr(n) for n in ("Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest", "Origin"))
# Added by the proxies in front (lower-case), never by a page without a preflight.
_PROXY_PREFIXES = ("x-forwarded-", "x-original-", "x-envoy-")
_PROXY_NAMES = frozenset({"forwarded", "via", "x-real-ip"})
# Never proof of a proxy even if `proxy.headers` names them: CORS-safelisted headers (a
# page sets them freely) and those the browser writes itself.
_NOT_PROXY = frozenset(
    {"accept", "accept-language", "content-language", "content-type", "range", "user-agent",
     "referer", "origin", "cookie", "authorization", "cache-control", "pragma", "priority",
     "host", "connection", "accept-encoding", "content-length"}
)  # fmt: skip
_CACHE_MAX = 1024

# A Host value -> (accepted by name, its port: explicit, else 80; None: not a Host at all).
_Parsed = tuple[bool, int | None]


class _Rules:
    """What one config accepts, with the verdicts on the Host values seen (few: a client
    sends the same one on every request)."""

    def __init__(self, config: Config, listen_host: str | None) -> None:
        allowed = {h.lower().rstrip(".") for h in config.settings.allowed_hosts}
        self.any_host = "*" in allowed
        self.suffixes = _PRIVATE_SUFFIXES + tuple(h[1:] for h in allowed if h.startswith("*."))
        self.names = {h for h in allowed if not h.startswith("*")}
        if listen_host:
            self.names.add(listen_host.lower().strip("[]").rstrip("."))
        self.proxy_names = _PROXY_NAMES | (_header_names(config.proxy) - _NOT_PROXY)
        self.hosts: dict[str, _Parsed] = {}

    def parse(self, value: str) -> _Parsed:
        """The verdict on a Host value not seen yet (screen looks in `hosts` first)."""
        parsed = self._parse(value)
        if len(self.hosts) >= _CACHE_MAX:
            self.hosts.clear()
        self.hosts[value] = parsed
        return parsed

    def _parse(self, value: str) -> _Parsed:
        if self.any_host:
            return True, None
        match = _HOST.fullmatch(value.strip().lower())
        if match is None:
            return False, None
        host, port = match.group(1), match.group(2)
        return self._accepts(host), int(port) if port else 80

    def _accepts(self, host: str) -> bool:
        if host.startswith("["):
            return _is_ip(host[1:-1]) and ":" in host
        name = host.removesuffix(".")
        if "." not in name or name in self.names or _is_ip(name):
            return True
        return name.endswith(self.suffixes)

    def proxied(self, request: web.Request) -> bool:
        for name in request.headers:
            lower = name.lower()
            if lower.startswith(_PROXY_PREFIXES) or lower in self.proxy_names:
                return True
        return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _header_names(spec: ProxySpec) -> frozenset[str]:
    names = [getattr(spec.headers, f) for f in spec.headers.__struct_fields__]
    names += [getattr(spec.trusted, f) for f in spec.trusted.__struct_fields__]
    return frozenset(n.lower() for n in names if isinstance(n, str))


def _local_port(request: web.Request) -> int | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return None  # a Unix socket: no browser reaches it


def screener(
    engine_key: web.AppKey[Engine], listen_host: str | None = None
) -> Callable[[web.Request], None]:
    """The check of every request (api.app.guard): raises ProblemError 421 for a Host the
    sidecar does not answer to, 403 for a browser's own call to /ext_authz."""
    # (the config the rules were built from, the rules): rebuilt when a reload swaps the
    # config (the config itself compared, as in api.auth). One frame on the usual request:
    # a Host seen before, accepted by its name, off /ext_authz.
    state: list[tuple[Config | None, _Rules | None]] = [(None, None)]

    def screen(request: web.Request) -> None:
        headers = request.headers
        host = headers.get(hdrs.HOST)
        config = request.app[engine_key].config
        built, rules = state[0]
        if built is not config or rules is None:
            rules = _Rules(config, listen_host)
            state[0] = (config, rules)
        ext_authz = request.path.startswith(EXT_AUTHZ)
        if host is not None:  # none: HTTP/1.0, not a browser (every browser sends one)
            by_name, port = rules.hosts.get(host) or rules.parse(host)
            if not by_name and (port is None or not ext_authz or port == _local_port(request)):
                raise ProblemError(
                    421,
                    f"Host: {host[:100]!r} is not a name this sidecar answers to (a page "
                    "whose name was pointed at it?); add it to settings.allowed_hosts",
                    field="Host",
                )
        if ext_authz:
            # The first browser header present, then one walk of the headers for a proxy's
            # (a proxied browser call, the usual one behind Envoy, carried several browser
            # headers, and the walk ran once for each).
            browser = next((b for b in _BROWSER if b in headers), None)
            if browser is not None and not rules.proxied(request):
                raise ProblemError(
                    403,
                    f"{browser}: a browser's own request; /ext_authz answers a proxy's "
                    "check (which carries X-Forwarded-*, X-Original-*, x-envoy-*, Via, "
                    "Forwarded or a proxy.headers name)",
                    field=str(browser),
                )

    return screen
