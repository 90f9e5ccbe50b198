"""The status page with hostile data, in real headless Chromium (tests.test_ui's driver):
a budget name made through the admin API carrying HTML and script (an `<img onerror>`, a
`</script>` break-out, markup) shows as text on the budget card and in the alerts table;
no script of it runs, no element of it exists. The identifiers the page puts into
attributes and URLs (budget, entity, rate limit, model ids) cannot carry markup at all:
400 naming the field, nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess, data_dump
from tests.test_ui import _post, chromium

# Each sets window.__xss if it ever runs (the page's CSP allows inline script and handlers,
# so markup reaching innerHTML would run; img-src 'self' lets src=x fail and fire onerror).
HOSTILE = (
    '<img src=x onerror="window.__xss=1"></script><script>window.__xss=2</script>'
    '<b id="injected">bold</b><svg onload="window.__xss=3"></svg>&amp;'
)
RATE_LIMIT = {"id": "rpm", "scope": "user", "metric": "requests", "limit": 60, "window": "1m",
              "model": "gpt-4o:2024/x", "provider": "acme"}  # fmt: skip


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[..., Path]
) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(redis_server.url, str(write_config({"budgets": []}))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


async def test_hostile_names_show_as_text_and_run_nothing(
    sidecar: SidecarProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    url = sidecar.url
    made = _post(f"{url}/api/v1/budgets", {"id": "evil", "name": HOSTILE, "scope": "user",
                                           "limit_usd": 1, "period": "monthly",
                                           "alert_thresholds": [50]})  # fmt: skip
    assert made["name"] == HOSTILE
    assert _post(f"{url}/v1/rate-limits", RATE_LIMIT)["id"] == "rpm"
    _post(f"{url}/v1/record", {"user_id": "u1", "cost_usd": 0.6})  # past 50%: an alert
    async with chromium(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=f"{url}/ui")
        await page.until(
            "document.body.dataset.ready && document.querySelectorAll('[data-budget]').length"
            " && document.querySelectorAll('#alerts td').length",
            "the hostile budget's card and alert",
        )
        assert await page.eval("typeof window.__xss") == "undefined"
        counts = await page.eval(
            "JSON.stringify(['img', 'script', 'svg', 'b', '#injected']"
            ".map(s => document.querySelectorAll(s).length))"
        )
        # The page's own one script; no element the name carried.
        assert json.loads(counts) == [0, 1, 0, 0, 0]
        card = await page.eval("document.querySelector('[data-budget=evil] strong').textContent")
        assert card == HOSTILE + " "
        alerts = await page.eval("document.getElementById('alerts').innerText")
        assert "u1" in alerts and "50%" in alerts
        limits = await page.eval("document.getElementById('limits').innerText")
        assert "acme/gpt-4o:2024/x" in limits
        await page.screenshot(tmp_path / "hostile.png")
        # Refreshed a few times over: still nothing ran.
        first = await page.eval("document.body.dataset.ready")
        await page.until(f"document.body.dataset.ready !== {json.dumps(first)}", "a refresh")
        assert await page.eval("typeof window.__xss") == "undefined"


MARKUP = '<img src=x onerror="alert(1)">'


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/budgets", {"id": MARKUP, "name": "n", "scope": "user",
                                     "limit_usd": 1, "period": "monthly"}, "id"),
        ("/api/v1/budgets", {"id": "b", "name": "n", "scope": "user", "scope_id": MARKUP,
                                     "limit_usd": 1, "period": "monthly"}, "scope_id"),
        ("/v1/rate-limits", {**RATE_LIMIT, "id": MARKUP}, "id"),
        ("/v1/rate-limits", {**RATE_LIMIT, "model": MARKUP}, "model"),
        ("/v1/record", {"agent_id": MARKUP, "cost_usd": 0.1}, "agent_id"),
        ("/v1/authorize", {"workflow_id": "</script>", "estimated_usd": 0.1},
         "workflow_id"),
        ("/v1/stops", {"scope": "agent", "scope_id": MARKUP, "reason": "r"}, "scope_id"),
    ],
)  # fmt: skip
async def test_identifiers_the_page_uses_cannot_carry_markup(
    make_client: ClientFactory, redis_client: redis.Redis, path: str, body: dict[str, Any],
    field: str,
) -> None:  # fmt: skip
    client = await make_client({"budgets": []})
    before = data_dump(redis_client)
    resp = await client.post(path, json=body)
    answer = await resp.json()
    assert (resp.status, answer.get("field")) == (400, field), answer
    assert resp.content_type == "application/problem+json"
    assert data_dump(redis_client) == before
