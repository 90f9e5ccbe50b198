"""Two browser attacks on a sidecar in open mode, in real headless Chromium (tests.test_ui's
driver), and the raw HTTP cases of the rules that stop them (sidecar.api.origin):

1. A page of another origin calls /ext_authz. `fetch(url, {mode: "no-cors"})` and `<img>`
   are simple requests (no CORS preflight), and /ext_authz takes its identity from the
   path (a route's defaults), so the page held spend (and burned rate limits) for it. The
   sidecar never read the answers, but the holds filled the budget. Now a request that
   carries a browser's own headers (Sec-Fetch-*, Origin) without any header only a proxy
   (or a preflighted request, which the sidecar never allows) carries is a 403.
2. DNS rebinding: a page at attacker.test:PORT whose name then resolves to 127.0.0.1 talks
   to a sidecar on PORT as its own origin: it read budgets and made stops and holds. Now a
   Host the sidecar does not answer to is a 421 (sidecar.api.origin's list).

Rebinding is simulated as it happens: the first server on 127.0.0.1:PORT (the attacker's)
serves the page and goes away, the sidecar starts on the same port, and Chromium's
`--host-resolver-rules` maps attacker.test to 127.0.0.1 throughout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar import config as config_mod
from sidecar.api.app import create_app
from sidecar.api.fast import FastServer
from sidecar.config import ConfigError
from sidecar.store import RedisStore
from tests import test_proxy_servers
from tests.conftest import make_config
from tests.harness import RedisServer, SidecarProcess, data_dump, free_port
from tests.test_proxy_servers import IDENTITY, Stack, StackFactory
from tests.test_proxy_servers import doc as proxy_doc
from tests.test_ui import Page, _get, chromium

BUDGET = {"id": "org-daily", "name": "org daily", "scope": "organization", "limit_usd": 1.0,
          "period": "daily"}  # fmt: skip
ROUTES = [{"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.25}}]
DOC: dict[str, Any] = {"budgets": [BUDGET], "proxy": {"routes": ROUTES}}
STOP = {"scope": "agent", "scope_id": "victim", "reason": "rebound"}
NEW_BUDGET = {"id": "rebound", "name": "rebound", "scope": "organization", "limit_usd": 0.001,
              "period": "monthly"}  # fmt: skip


def held_usd(url: str) -> Any:
    return _get(f"{url}/v1/budgets/org-daily/status")["held_usd"]


async def serve_page(port: int, routes: dict[str, str]) -> web.AppRunner:
    """An origin's server on 127.0.0.1:port: path -> body. Every answer closes its
    connection, so the browser's next request opens a new one (to whoever listens then)."""

    async def answer(request: web.Request) -> web.Response:
        body = routes.get(request.path)
        if body is None:
            return web.Response(status=404, text="attacker", headers={"Connection": "close"})
        kind = "text/html" if body.startswith("<!doctype") else "text/plain"
        resp = web.Response(text=body, content_type=kind, headers={"Cache-Control": "no-store"})
        resp.force_close()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


# ---- 1. a cross-origin page against /ext_authz ------------------------------------------


def ext_authz_page(target: str) -> str:
    """Holds through /ext_authz without a preflight: no-cors GET and POST (text/plain
    body), and an image, 3 + 3 + 3 of them (each would hold the route's 0.25)."""
    url = json.dumps(target + "/ext_authz/v1/chat/completions")
    return (
        "<!doctype html><script>(async () => {"
        "const u = " + url + ";"
        "for (let i = 0; i < 3; i++) {"
        "  await fetch(u + '?get=' + i, {mode: 'no-cors', cache: 'no-store'}).catch(() => 0);"
        "  await fetch(u + '?post=' + i, {method: 'POST', mode: 'no-cors', body: 'x'})"
        "    .catch(() => 0);"
        "  await new Promise(done => { const img = new Image();"
        "    img.onload = img.onerror = done; img.src = u + '?img=' + i; });"
        "}"
        "document.title = 'sent';})();</script>"
    )


@pytest.mark.parametrize("fast_http", [True, False])
async def test_a_cross_origin_page_cannot_hold_through_ext_authz(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[..., Path],
    tmp_path: Path,
    fast_http: bool,
) -> None:
    doc = {**DOC, "settings": {"fast_http": fast_http}}
    sidecar = SidecarProcess(redis_server.url, str(write_config(doc))).start()
    page_port = free_port()
    runner = await serve_page(page_port, {"/": ext_authz_page(sidecar.url)})
    try:
        before = data_dump(redis_client)
        async with chromium(tmp_path / "profile") as page:
            # localhost, not 127.0.0.1: another origin (and site) than the sidecar's.
            await page.send("Network.enable")
            await page.send("Page.navigate", url=f"http://localhost:{page_port}/")
            await page.until("document.title === 'sent'", "the page's requests sent")
            statuses = ext_authz_statuses(page)
        # All 9 reached the sidecar (Chromium saw its answers), each refused before a hold.
        assert statuses == [403] * 9, statuses
        assert held_usd(sidecar.url) == 0
        assert data_dump(redis_client) == before
    finally:
        await runner.cleanup()
        sidecar.cleanup()


def ext_authz_statuses(page: Page) -> list[int]:
    """The statuses of the /ext_authz answers Chromium received, in order: opaque to the
    page, not to DevTools (the head's ExtraInfo also comes for an answer ORB then blocks
    from an <img>)."""
    sent = {
        e["params"]["requestId"]
        for e in page.events
        if e["method"] == "Network.requestWillBeSent"
        and "/ext_authz/" in e["params"]["request"]["url"]
    }
    return [
        e["params"]["statusCode"]
        for e in page.events
        if e["method"] == "Network.responseReceivedExtraInfo" and e["params"]["requestId"] in sent
    ]


# ---- 2. DNS rebinding --------------------------------------------------------------------

REBINDING_PAGE = (
    (
        "<!doctype html><script>(async () => {"
        "document.title = 'loaded';"
        "let rebound = false;"
        "for (let i = 0; i < 900 && !rebound; i++) {"
        "  await new Promise(r => setTimeout(r, 100));"
        "  try { const r = await fetch('/probe', {cache: 'no-store'});"
        "        rebound = (await r.text()) !== 'attacker'; } catch (e) {}"
        "}"
        "const out = {};"
        "const call = async (method, path, body, headers) => {"
        "  const h = Object.assign({}, headers || {});"
        "  if (body) h['Content-Type'] = 'application/json';"
        "  try { const r = await fetch(path, {method, headers: h, cache: 'no-store',"
        "          body: body ? JSON.stringify(body) : undefined});"
        "        out[method + ' ' + path] = [r.status, await r.text()]; }"
        "  catch (e) { out[method + ' ' + path] = ['error', String(e)]; }"
        "};"
        "await call('POST', '/v1/stops', STOP);"
        "await call('POST', '/api/v1/budgets', NEW_BUDGET);"
        "await call('GET', '/api/v1/budgets');"
        "await call('GET', '/ext_authz/v1/chat/completions', null,"
        "           {'x-user-id': 'victim', 'x-budget-estimate-usd': '0.5'});"
        "window.__out = out; document.title = 'done';"
        "})();</script>"
    )
    .replace("NEW_BUDGET", json.dumps(NEW_BUDGET))
    .replace("STOP", json.dumps(STOP))
)


@pytest.mark.parametrize("fast_http", [True, False])
async def test_a_rebinding_page_gets_421_and_changes_nothing(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[..., Path],
    tmp_path: Path,
    fast_http: bool,
) -> None:
    doc = {**DOC, "settings": {"fast_http": fast_http}}
    port = free_port()
    attacker = await serve_page(port, {"/": REBINDING_PAGE})
    sidecar = SidecarProcess(redis_server.url, str(write_config(doc)))
    sidecar.port = port  # the same origin, attacker.test:port, now answered by the sidecar
    flags = ["--host-resolver-rules=MAP attacker.test 127.0.0.1"]
    try:
        async with chromium(tmp_path / "profile", flags) as page:
            await page.send("Page.navigate", url=f"http://attacker.test:{port}/")
            await page.until("document.title === 'loaded'", "the attacker's page")
            await attacker.cleanup()  # the name now leads to the sidecar
            before = data_dump(redis_client)
            await asyncio.to_thread(sidecar.start)
            await page.until("document.title === 'done'", "the page's calls made", tries=900)
            out = await page.eval("JSON.stringify(window.__out)")
        answers = {c: (status, json.loads(body)) for c, (status, body) in json.loads(out).items()}
        assert {call: status for call, (status, _) in answers.items()} == {
            "POST /v1/stops": 421, "POST /api/v1/budgets": 421, "GET /api/v1/budgets": 421,
            "GET /ext_authz/v1/chat/completions": 421,
        }  # fmt: skip
        for _, body in answers.values():
            assert body["field"] == "Host" and "attacker.test" in body["detail"], body
        assert data_dump(redis_client) == before
        assert _get(f"{sidecar.url}/v1/stops") == {"stops": []}
        assert held_usd(sidecar.url) == 0
    finally:
        await attacker.cleanup()
        sidecar.cleanup()


# ---- the rules, over raw HTTP, on the fast path and on aiohttp ----------------------------

Serve = Callable[..., Any]
AUTHORIZE = json.dumps({"user_id": "u1", "estimated_usd": 0.01}).encode()


@pytest.fixture
async def serve(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(fast: bool, doc: dict[str, Any] | None = None, **kw: Any) -> TestServer:
        base = doc if doc is not None else DOC
        settings = {**base.get("settings", {}), "fast_http": fast}
        cfg = make_config({**base, "settings": settings})
        store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
        srv = TestServer(create_app(cfg, store, **kw), host="127.0.0.1")
        await srv.start_server()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.close()


async def ask(
    srv: TestServer,
    method: str,
    path: str,
    host: str | None,
    *lines: str,
    body: bytes = b"",
    version: str = "1.1",
) -> tuple[int, dict[str, Any] | None]:
    """One request on its own connection, exactly these header lines; (status, JSON body)."""
    head = [f"{method} {path} HTTP/{version}", *([f"Host: {host}"] if host is not None else [])]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(("\r\n".join([*head, *lines]) + "\r\n\r\n").encode() + body)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", answer)
        empty = method == "HEAD" or not length
        data = b"" if empty else await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), json.loads(data) if data else None


def served(srv: TestServer) -> int:
    """Requests the fast path served itself (none: aiohttp served all)."""
    assert srv.runner is not None
    server = srv.runner.server
    return server.served if isinstance(server, FastServer) else 0


# Accepted by default: addresses, names without a dot, and names public DNS never answers.
ACCEPTED = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "10.1.2.3:8787",
            "127.0.0.1", "budget-sidecar", "budget_sidecar", "LOCALHOST.:{port}",
            "app.localhost:{port}", "budget-sidecar.agents.svc:8787",
            "budget-sidecar.agents.svc.cluster.local:8787"]  # fmt: skip
REFUSED = ["attacker.test:{port}", "localhost.attacker.test:{port}",
           "127.0.0.1.nip.io:{port}", "budget-sidecar.dev:{port}", "evil.test:abc", "a b",
           "[not-an-ip]:{port}", "[127.0.0.1]:{port}", ""]  # fmt: skip
CALLS = [("POST", "/v1/authorize", AUTHORIZE), ("POST", "/v1/stops", json.dumps(STOP).encode()),
         ("GET", "/v1/stops", b""), ("GET", "/healthz", b""), ("GET", "/readyz", b""),
         ("GET", "/ext_authz/v1/chat/completions", b"")]  # fmt: skip


@pytest.mark.parametrize("fast", [True, False])
async def test_a_host_not_answered_to_is_421_on_every_route_and_changes_nothing(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    srv = await serve(fast, {**DOC, "budgets": [{**BUDGET, "limit_usd": 10}]})
    before = data_dump(redis_client)
    refused: list[tuple[str, str]] = []
    for template in REFUSED:
        host = template.format(port=srv.port)
        for method, path, body in CALLS:
            status, problem = await ask(srv, method, path, host, body=body)
            assert problem is not None, (host, path, status)
            assert (status, problem["field"]) == (421, "Host"), (host, path, problem)
            refused.append((host, path))
    # Without a port (80): refused too, but on /ext_authz that is a proxy's check
    # (test_ext_authz_takes_a_proxys_foreign_host_but_not_at_the_sidecars_port).
    for method, path, body in CALLS[:-1]:
        status, _ = await ask(srv, method, path, "attacker.test", body=body)
        assert status == 421, path
    assert len(refused) == len(REFUSED) * len(CALLS)
    assert data_dump(redis_client) == before
    # The hot routes (authorize, /ext_authz) refused by the fast path itself.
    assert served(srv) == (2 * len(REFUSED) + 1 if fast else 0)
    stopped = 0
    for template in ACCEPTED:
        host = template.format(port=srv.port)
        for method, path, body in CALLS:
            status, _ = await ask(srv, method, path, host, body=body)
            if path == "/v1/stops" and method == "POST":
                stopped += status == 201
                await ask(srv, "DELETE", "/v1/stops/agent/victim", host)
            else:
                assert status == 200, (host, path, status)
    assert stopped == len(ACCEPTED)
    # Without a Host (HTTP/1.0): not a browser, accepted.
    status, _ = await ask(srv, "GET", "/v1/stops", None, version="1.0")
    assert status == 200


@pytest.mark.parametrize("fast", [True, False])
async def test_allowed_hosts_and_the_listen_host_are_answered_to(serve: Serve, fast: bool) -> None:
    doc = {**DOC, "settings": {"allowed_hosts": ["Sidecar.Corp.Example", "*.agents.example"]}}
    srv = await serve(fast, doc, listen_host="listen.corp.example")
    for host, expected in [
        ("sidecar.corp.example:8787", 200), ("SIDECAR.corp.example.", 200),
        ("a.agents.example", 200), ("b.c.agents.example:1", 200),
        ("listen.corp.example:{port}", 200),
        ("agents.example", 421), ("xagents.example", 421), ("corp.example", 421),
    ]:  # fmt: skip
        status, _ = await ask(
            srv, "POST", "/v1/authorize", host.format(port=srv.port), body=AUTHORIZE
        )
        assert status == expected, host
    # `*`: any Host (the check off).
    srv = await serve(fast, {**DOC, "settings": {"allowed_hosts": ["*"]}})
    for host in [f"attacker.test:{srv.port}", "a b"]:
        status, _ = await ask(srv, "POST", "/v1/authorize", host, body=AUTHORIZE)
        assert status == 200, host


@pytest.mark.parametrize("fast", [True, False])
async def test_ext_authz_takes_a_proxys_foreign_host_but_not_at_the_sidecars_port(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """Envoy's check and Caddy's forward_auth carry the client's Host (the proxy's public
    name): accepted on /ext_authz when it names another port; a rebinding page's names the
    sidecar's own port. Elsewhere a foreign name is refused whatever its port."""
    srv = await serve(fast)
    check = "/ext_authz/v1/chat/completions"
    assert (await ask(srv, "GET", check, "api.example.test:10000", "x-envoy-internal: true"))[
        0
    ] == 200
    assert (await ask(srv, "POST", check, "api.example.test"))[0] == 200  # port 80
    assert (await ask(srv, "GET", check, f"api.example.test:{srv.port}"))[0] == 421
    assert (await ask(srv, "GET", "/v1/stops", "api.example.test:10000"))[0] == 421
    status, _ = await ask(srv, "POST", "/v1/authorize", "api.example.test:1", body=AUTHORIZE)
    assert status == 421
    # Two holds of the route's 0.25, nothing else.
    assert await held(srv) == 0.5


async def held(srv: TestServer) -> Any:
    status, body = await ask(srv, "GET", "/v1/budgets/org-daily/status", "127.0.0.1")
    assert status == 200 and body is not None
    return body["held_usd"]


BROWSER = ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors", "Sec-Fetch-Dest: empty"]


@pytest.mark.parametrize("fast", [True, False])
async def test_ext_authz_refuses_a_browsers_own_call_and_takes_a_proxied_one(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    srv = await serve(fast, {**DOC, "budgets": [{**BUDGET, "limit_usd": 10}]})
    check = "/ext_authz/v1/chat/completions"
    host = f"127.0.0.1:{srv.port}"
    before = data_dump(redis_client)
    # What a page's no-preflight request carries: each of the browser's headers alone,
    # with the headers a page may set freely, or the browser's own.
    refused = [
        (BROWSER, "Sec-Fetch-Site"),
        (["Sec-Fetch-Mode: navigate"], "Sec-Fetch-Mode"),
        (["Sec-Fetch-Dest: image"], "Sec-Fetch-Dest"),
        (["Origin: http://evil.test"], "Origin"),
        (["Origin: null", "Content-Type: text/plain", "Accept-Language: x-forwarded-for"],
         "Origin"),
        ([*BROWSER, "Referer: http://evil.test/", "User-Agent: Chrome", "Accept: */*",
          "Cookie: a=b", "Priority: u=1"], "Sec-Fetch-Site"),
    ]  # fmt: skip
    for method in ("GET", "POST", "HEAD"):
        for lines, field in refused:
            status, problem = await ask(srv, method, check, host, *lines)
            assert status == 403, (method, lines)
            if method != "HEAD":
                assert problem is not None and problem["field"] == field
    assert data_dump(redis_client) == before
    assert served(srv) == (3 * len(refused) if fast else 0)
    # The same browser behind each real proxy: the check also carries the proxy's own
    # headers (tests/test_attack25_browser.py's proxy test runs the real ones).
    proxied = [
        ["x-envoy-internal: true", "x-envoy-expected-rq-timeout-ms: 500"],  # Envoy
        ["X-Original-URI: /v1/chat/completions", "X-Original-Method: POST"],  # nginx
        ["X-Forwarded-For: 127.0.0.1", "X-Forwarded-Uri: /v1/chat/completions"],  # Traefik
        ["Via: 1.1 Caddy"],  # Caddy 2.11 (and X-Forwarded-*)
        ["x-forwarded-method: POST"],  # HAProxy's Lua action
        ["Forwarded: for=127.0.0.1"], ["X-Real-IP: 127.0.0.1"],
        ["x-user-id: u1"],  # a proxy.headers name: no page sends it without a preflight
    ]  # fmt: skip
    for lines in proxied:
        status, _ = await ask(srv, "GET", check, host, *BROWSER, "Origin: http://a.test", *lines)
        assert status == 200, lines
    # And what no browser sent (curl, a proxy that forwards none of the browser's headers).
    assert (await ask(srv, "GET", check, host))[0] == 200
    assert await held(srv) == 0.25 * (len(proxied) + 1)
    # Off /ext_authz the rule does not apply (the 415 rule covers bodies from a browser).
    assert (await ask(srv, "GET", "/v1/stops", host, *BROWSER))[0] == 200


@pytest.mark.parametrize("fast", [True, False])
async def test_with_credentials_both_rules_apply_before_them(serve: Serve, fast: bool) -> None:
    """Credentials configured: a rebinding page has none (the browser keeps them per
    origin), but the open paths (/metrics, /readyz) would still answer it, and a page
    of another site can ride the Basic credentials the browser has cached for the
    sidecar's origin. So both rules apply in that mode too, before the credentials."""
    clients = [{"client_id": "bot", "role": "agent", "tenant": "default", "secret": "s3cret-1"}]
    srv = await serve(fast, {**DOC, "auth": {"clients": clients}})
    basic = "Authorization: Basic " + base64.b64encode(b"bot:s3cret-1").decode()
    own, foreign = f"127.0.0.1:{srv.port}", f"attacker.test:{srv.port}"
    check = "/ext_authz/v1/chat/completions"
    cases = [
        ("POST", "/v1/authorize", own, [basic], 200), ("POST", "/v1/authorize", own, [], 401),
        ("POST", "/v1/authorize", foreign, [basic], 421), ("GET", "/readyz", foreign, [], 421),
        ("GET", "/readyz", own, [], 200), ("GET", check, own, [basic], 200),
        ("GET", check, own, [basic, *BROWSER], 403),
        ("GET", check, own, [basic, *BROWSER, "x-envoy-internal: true"], 200),
    ]  # fmt: skip
    for method, path, host, lines, expected in cases:
        body = AUTHORIZE if path == "/v1/authorize" else b""
        status, _ = await ask(srv, method, path, host, *lines, body=body)
        assert status == expected, (method, path, host, lines)


@pytest.mark.parametrize(
    "value", ["x.example:8787", "http://x.example", "a b", "*x.example", "x.*.example", "",
              "[::1]", "x/y"],
)  # fmt: skip
def test_a_bad_allowed_host_refuses_the_config_naming_it(
    write_config: Callable[..., Path], value: str
) -> None:
    path = write_config({"settings": {"allowed_hosts": ["ok.example", value]}})
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    assert (caught.value.source, caught.value.path) == (str(path), "$.settings.allowed_hosts[1]")


# ---- a browser behind each real proxy still gets through ---------------------------------

make_stack, proxy_kind = test_proxy_servers.make_stack, test_proxy_servers.proxy_kind
BROWSER_THROUGH = ["Origin: http://app.example.test", "Referer: http://app.example.test/",
                   "Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: cors", "Sec-Fetch-Dest: empty",
                   "User-Agent: Mozilla/5.0 Chrome/156", "Accept: */*"]  # fmt: skip


async def through(stack: Stack, host: str, lines: list[str]) -> tuple[int, bytes]:
    """POST /v1/chat/completions through the proxy, with this Host and these lines."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}", "Connection: close",
            "Content-Type: application/json", "Content-Length: 2", *lines]  # fmt: skip
    writer.write(("\r\n".join(head) + "\r\n\r\n{}").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    top, _, body = answer.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), body


async def test_a_browser_behind_each_real_proxy_still_holds_and_passes(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    """Every proxy passes the browser's Origin and Sec-Fetch-* on to the check (but Envoy,
    which forwards only its allowed_headers) and adds a header of its own; Envoy and Caddy
    also pass the client's Host on, here a public name on the proxy's port."""
    stack = await make_stack(proxy_doc(), proxy_kind)
    port = stack.proxy.port
    # Caddy's site is matched by its Host (http://127.0.0.1:PORT in the example).
    hosts = [f"127.0.0.1:{port}"] if proxy_kind.startswith("caddy") else [
        f"127.0.0.1:{port}", f"api.example.test:{port}", "api.example.test"]  # fmt: skip
    identity = [f"{k}: {v}" for k, v in IDENTITY.items()]
    for host in hosts:
        lines = [*identity, *BROWSER_THROUGH, "x-budget-estimate-usd: 0.1"]
        status, body = await through(stack, host, lines)
        assert (status, body) == (200, b'{"ok": true}'), (host, stack.proxy.output()[-2000:])
    assert len(stack.seen) == len(hosts)
    assert (await stack.budget())["held_usd"] == round(0.1 * len(hosts), 6)


async def test_the_openapi_document_names_both_answers(serve: Serve) -> None:
    srv = await serve(True)
    status, spec = await ask(srv, "GET", "/openapi.json", "localhost")
    assert status == 200 and spec is not None
    operations = [
        (path, op) for path, item in spec["paths"].items() for op in item.values()
        if isinstance(op, dict) and "responses" in op
    ]  # fmt: skip
    assert [p for p, op in operations if "421" not in op["responses"]] == []
    hooks = [op for p, op in operations if p.startswith("/ext_authz")]
    assert len(hooks) == 2 * 8  # every method, on /ext_authz and below it
    assert [op for op in hooks if "403" not in op["responses"]] == []
