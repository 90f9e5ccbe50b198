"""Apps in-process over a Redis the test chose (its own redis-server, restarted or flushed
as it likes), and the call that asserts what every answer must be. For tests that run
several sidecars over one store (two replicas noticing one state loss), where conftest's
`make_client` (one store, the session's Redis) does not fit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import create_app
from sidecar.clock import Clock, FakeClock
from sidecar.metrics import Metrics
from sidecar.store import open_store
from tests.conftest import T0_MS, make_config

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite


async def app_over(
    url: str,
    document: dict[str, Any],
    *,
    clock: Clock | None = None,
    events: Metrics | None = None,
) -> TestClient[Any, Any]:
    """A started TestClient of the app for `document` over the store at `url` (any URL
    `serve` takes: one Redis, a Cluster, Sentinel), opened as `serve` opens it (its
    timeout the document's redis_timeout_ms); its clock `clock` (default a FakeClock at
    T0_MS), `events` its Metrics if given. The caller closes it."""
    cfg = make_config(document)
    store = open_store(url, timeout_ms=cfg.settings.redis_timeout_ms)
    app = create_app(cfg, store, clock=clock or FakeClock(T0_MS), events=events)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def call(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    guard_s: float = GUARD_S,
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); a 500 or a stack trace fails the test wherever it appears."""

    async def go() -> tuple[int, dict[str, Any]]:
        resp = await client.request(method, path, json=body, headers=headers)
        text = await resp.text()
        assert "Traceback" not in text, text
        assert resp.status != 500, text
        return resp.status, json.loads(text) if text else {}

    return await asyncio.wait_for(go(), guard_s)
