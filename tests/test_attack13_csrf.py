"""A hostile web page, open in a browser on the sidecar's host, against the management
API (real headless Chromium, tests.test_ui's driver; the page served from another
origin). A cross-origin `fetch(..., {mode: "no-cors"})` is sent without a preflight when
its body is "simple": form encodings and text/plain get 415 (not JSON), but a Blob without
a type is sent with no Content-Type at all, which the sidecar read as JSON. So the page
could make stops, budgets, rate limits and charges (in open mode, or with Basic
credentials the browser had cached). A body without a Content-Type from a browser (it
sends `Origin` on every POST) is now 415 too: nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess, data_dump, free_port
from tests.test_ui import _get, chromium

STOP = {"scope": "agent", "scope_id": "victim", "reason": "csrf"}
BUDGET = {"id": "csrf", "name": "csrf", "scope": "organization", "limit_usd": 0.001,
          "period": "monthly"}  # fmt: skip


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[..., Path]
) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(redis_server.url, str(write_config({"budgets": []}))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def hostile_page(target: str) -> str:
    calls = [("/v1/stops", STOP), ("/api/v1/budgets", BUDGET),
             ("/v1/record", {"agent_id": "victim", "cost_usd": 5})]  # fmt: skip
    sends = "".join(
        f"await fetch({json.dumps(target + path)}, {{method: 'POST', mode: 'no-cors', "
        f"body: new Blob([{json.dumps(json.dumps(body))}])}}).catch(() => null);"
        for path, body in calls
    )
    return (
        "<!doctype html><script>(async () => {" + sends + "document.title = 'sent';})();</script>"
    )


async def test_a_cross_origin_page_cannot_write_through_the_api(
    sidecar: SidecarProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    page_html = hostile_page(sidecar.url)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=page_html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    before = data_dump(redis_client)
    try:
        async with chromium(tmp_path / "profile") as page:
            # localhost, not 127.0.0.1: another origin (and another site) than the sidecar's.
            await page.send("Page.navigate", url=f"http://localhost:{port}/")
            await page.until("document.title === 'sent'", "the page's requests sent")
    finally:
        await runner.cleanup()
    assert _get(f"{sidecar.url}/v1/stops") == {"stops": []}
    assert [b["id"] for b in _get(f"{sidecar.url}/api/v1/budgets")["budgets"]] == []
    assert _get(f"{sidecar.url}/api/v1/usage")["total_requests"] == 0
    assert data_dump(redis_client) == before


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/stops", STOP), ("/api/v1/budgets", BUDGET), ("/v1/authorize", {"cost_usd": 1}),
     ("/v1/record", {"cost_usd": 1})],
)  # fmt: skip
async def test_a_typeless_body_with_an_origin_is_415_and_writes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, path: str, body: Any,
    fast_http: bool,
) -> None:  # fmt: skip
    client = await make_client({"budgets": [], "settings": {"fast_http": fast_http}})
    before = data_dump(redis_client)
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        resp = await client.post(
            path, data=json.dumps(body).encode(), headers={"Origin": origin},
            skip_auto_headers=["Content-Type"],
        )  # fmt: skip
        answer = await resp.json()
        assert (resp.status, answer.get("field")) == (415, "Content-Type"), (origin, answer)
    assert data_dump(redis_client) == before
    # Without an Origin (not a browser: nc, HAProxy's httpclient) it is still read as JSON.
    resp = await client.post(
        "/v1/stops", data=json.dumps(STOP).encode(), skip_auto_headers=["Content-Type"]
    )
    assert resp.status == 201, await resp.text()
