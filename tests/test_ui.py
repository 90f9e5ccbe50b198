"""The status page (issue #17) in real headless Chromium (Debian `chromium`), driven over
the DevTools protocol: after some spend its figures equal the status API's, it lists the
rate limits and the last alerts, it refreshes by itself, and with credentials configured
it shows nothing until they are entered (the page is static; its data calls carry them).
A screenshot is saved under the test's tmp_path."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import RedisServer, SidecarProcess, missing, stop_process

SECRET = "page-secret-1"
DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org monthly", "scope": "organization", "limit_usd": 10,
         "period": "monthly", "alert_thresholds": [50]},
        {"id": "each-user", "name": "Each user, $5 a day", "scope": "user", "limit_usd": 5,
         "period": "daily", "alert_thresholds": [50, 80]},
    ],
    "rate_limits": [
        {"id": "user-rpm", "scope": "user", "metric": "requests", "limit": 60, "window": "1m",
         "burst": 59},
        {"id": "agent-inflight", "scope": "agent", "metric": "concurrent", "limit": 5},
    ],
}  # fmt: skip
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1100,900",
]
DEVTOOLS = ["--remote-debugging-port=0"]


def _post(url: str, body: dict[str, Any], auth: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _get(url: str, auth: str | None = None) -> Any:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return json.loads(r.read())


class Page:
    """One Chromium tab over the DevTools protocol (aiohttp's WebSocket client)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = count(1)
        # The events received while waiting for answers (Network.* once enabled).
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self._ws.receive_json(timeout=30)
            if message.get("id") == call_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
            if "method" in message:
                self.events.append(message)

    async def eval(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def until(self, expression: str, what: str, tries: int = 300) -> Any:
        """Poll a condition the page reaches by itself (bounded by count, not by time)."""
        for _ in range(tries):
            result = await self.send(
                "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
            )
            # An exception (the page not loaded yet) counts as "not yet".
            value = None if "exceptionDetails" in result else result["result"].get("value")
            if value:
                return value
            await asyncio.sleep(0.1)
        text = await self.eval("document.body.innerText")
        raise AssertionError(f"the page never showed {what}; it shows:\n{text}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def chromium(profile: Path, flags: Sequence[str] = ()) -> AsyncIterator[Page]:
    """A headless Chromium tab; `flags` are added to CHROMIUM_FLAGS (e.g.
    --host-resolver-rules)."""
    binary = shutil.which("chromium")
    if binary is None:
        missing("chromium (apt-get install chromium)")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}", *DEVTOOLS, "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert proc.poll() is None, "chromium exited"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                yield page
    finally:
        stop_process(proc)


FIGURES = """JSON.stringify([...document.querySelectorAll('[data-budget]')].map(card => ({
  budget: card.dataset.budget, entity: card.dataset.entity,
  ...Object.fromEntries([...card.querySelectorAll('[data-field]')].map(
      f => [f.dataset.field, Number(f.dataset.value)]))})))"""


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[..., Path]
) -> Iterator[SidecarProcess]:
    clients = [
        {"client_id": "viewer", "tenant": "acme", "role": "read", "secret": SECRET},
        {"client_id": "bot", "tenant": "acme", "role": "agent", "secret": SECRET},
    ]
    doc = {**DOC, "auth": {"clients": clients}}
    proc = SidecarProcess(redis_server.url, str(write_config(doc))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


async def test_the_page_shows_what_the_status_api_says(
    sidecar: SidecarProcess, tmp_path: Path
) -> None:
    url, bot = sidecar.url, f"bot:{SECRET}"
    # Some spend: u1 settled $3.25 (past 50%: an alert) and holds $0.50; u2 settled $0.40.
    held = _post(f"{url}/v1/authorize", {"user_id": "u1", "estimated_usd": 3.5}, bot)
    assert held["allowed"] is True
    _post(f"{url}/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": 3.25}, bot)
    assert _post(f"{url}/v1/authorize", {"user_id": "u1", "estimated_usd": 0.5}, bot)["allowed"]
    _post(f"{url}/v1/record", {"user_id": "u2", "cost_usd": 0.4}, bot)

    # The page itself is open and static: nothing in it but the page.
    with urllib.request.urlopen(f"{url}/ui", timeout=10) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "Each user" not in html and "u1" not in html
    assert "http://" not in html and "https://" not in html  # no external asset

    async with chromium(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=f"{url}/")
        # Without credentials: the login form, no data.
        await page.until("!document.getElementById('login').hidden", "the login form")
        assert await page.eval("document.querySelectorAll('[data-budget]').length") == 0
        assert "Each user" not in await page.eval("document.body.innerText")
        await page.screenshot(tmp_path / "login.png")

        await page.eval(
            "document.getElementById('client-id').value = 'viewer';"
            f"document.getElementById('secret').value = {json.dumps(SECRET)};"
            "document.getElementById('login').requestSubmit(); true"
        )
        await page.until("document.body.dataset.ready", "data")
        shown = json.loads(await page.until(
            f"(() => {{ const f = {FIGURES}; return JSON.parse(f).length >= 3 ? f : null; }})()",
            "three budget cards",
        ))  # fmt: skip
        viewer = f"viewer:{SECRET}"
        expected = []
        for budget, entity in [("org", None), ("each-user", "u1"), ("each-user", "u2")]:
            q = f"?scope_id={entity}" if entity else ""
            s = _get(f"{url}/v1/budgets/{budget}/status{q}", viewer)
            expected.append({"budget": budget, "entity": s["entity"], "used": s["used_usd"],
                             "held": s["held_usd"], "remaining": s["remaining_usd"],
                             "limit": s["limit_usd"]})  # fmt: skip
        assert sorted(shown, key=str) == sorted(expected, key=str)
        # The figures are what was spent, not just what the API echoes.
        u1 = next(c for c in shown if c["entity"] == "u1")
        assert (u1["used"], u1["held"], u1["remaining"]) == (3.25, 0.5, 1.25)
        text = await page.eval("document.body.innerText")
        assert "user-rpm" in text and "agent-inflight" in text  # the rate limits
        assert "50%" in text and "u1" in text  # u1's alert
        assert "resets" in text
        await page.screenshot(tmp_path / "status.png")

        # It refreshes by itself: more spend shows up without a reload.
        first = await page.eval("document.body.dataset.ready")
        _post(f"{url}/v1/record", {"user_id": "u2", "cost_usd": 1.0}, bot)
        await page.until(
            f"document.body.dataset.ready !== {json.dumps(first)} && "
            "[...document.querySelectorAll('[data-entity=u2] [data-field=used]')]"
            ".some(f => Number(f.dataset.value) === 1.4)",
            "u2's new spend",
        )
        # The credential stays in this tab: sessionStorage, never a cookie.
        assert await page.eval("document.cookie") == ""
        assert await page.eval("sessionStorage.length") == 1
    print(f"screenshots: {tmp_path / 'login.png'} {tmp_path / 'status.png'}")


def test_without_credentials_the_data_routes_answer_401(sidecar: SidecarProcess) -> None:
    for path in ("/api/v1/budgets", "/v1/budgets/org/status", "/v1/rate-limits"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(sidecar.url + path, timeout=10)
        assert caught.value.code == 401, path
        caught.value.close()
