"""Two corners of the real AxonFlow SDK (axonflow 9.5.0) against a real sidecar process
over a real Redis (issue 15, item 5), telemetry off:

- the status of a per-entity budget (no scope_id) is readable through get_budget_status,
  the entity named after a "/" in the id the SDK puts into the path unencoded;
- AxonFlow.sync() used inside a running event loop works call after call: the sidecar
  answers the Python SDK with `Connection: close` (a kept-alive connection belongs to the
  dead loop of the previous call), while the native /v1 routes and other clients keep
  their connections alive.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer, SidecarProcess, missing

os.environ["AXONFLOW_TELEMETRY"] = "off"
os.environ.pop("AXONFLOW_TRY", None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

try:
    from axonflow import AxonFlow
    from axonflow.exceptions import AxonFlowError
    from axonflow.types import BudgetCheckRequest, TokenUsage

    HAVE_SDK = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_SDK = False

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org-monthly", "name": "Monthly", "scope": "organization", "limit_usd": 100,
         "period": "monthly"},
        {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 2,
         "period": "daily", "on_exceed": "block"},
        {"id": "each-team", "name": "Each team", "scope": "team", "limit_usd": 1,
         "period": "weekly", "on_exceed": "warn"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
    ],
}  # fmt: skip
SDK_HEADERS = {"X-Axonflow-Client": "sdk-python/9.5.0", "User-Agent": "axonflow-sdk-python/9.5.0"}


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> Iterator[SidecarProcess]:
    if not HAVE_SDK:
        missing("the axonflow SDK (pip install -e '.[dev]')")
    proc = SidecarProcess(redis_server.url, str(write_config(DOC))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def _record(sidecar: SidecarProcess, **fields: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=5)
    try:
        conn.request("POST", "/v1/record", json.dumps(fields),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()


# ---- per-entity status ---------------------------------------------------------------------


async def test_async_sdk_reads_one_entity_of_a_per_entity_budget(sidecar: SidecarProcess) -> None:
    _record(sidecar, user_id="alice", cost_usd=0.5)
    _record(sidecar, user_id="alice", cost_usd=0.25)
    _record(sidecar, user_id="bob", cost_usd=2.0)
    _record(sidecar, team_id="t.1", cost_usd=0.1)
    async with AxonFlow(endpoint=sidecar.url) as client:
        alice = await client.get_budget_status("each-user/alice")
        assert (alice.used_usd, alice.remaining_usd, alice.percentage) == (0.75, 1.25, 37.5)
        assert not alice.is_exceeded and not alice.is_blocked
        assert alice.budget.id == "each-user" and alice.budget.scope == "user"
        assert alice.budget.scope_id is None
        bob = await client.get_budget_status("each-user/bob")
        assert (bob.used_usd, bob.percentage, bob.is_exceeded, bob.is_blocked) == (
            2.0, 100.0, True, True)  # fmt: skip
        nobody = await client.get_budget_status("each-user/carol")
        assert (nobody.used_usd, nobody.remaining_usd) == (0.0, 2.0)
        team = await client.get_budget_status("each-team/t.1")
        assert (team.used_usd, team.is_exceeded, team.is_blocked) == (0.1, False, False)
        assert team.period_start.endswith("Z") and team.period_end.endswith("Z")
        # An org budget names no entity, as before.
        assert (await client.get_budget_status("org-monthly")).used_usd == 2.85

        # Without an entity: 400 saying how to name one (no silent zero).
        with pytest.raises(AxonFlowError) as bare:
            await client.get_budget_status("each-user")
        assert "HTTP 400" in str(bare.value)
        assert "get_budget_status('each-user/<user id>')" in str(bare.value)
        # Not an identifier, and an unknown budget.
        with pytest.raises(AxonFlowError, match="HTTP 400"):
            await client.get_budget_status("each-user/a b")
        with pytest.raises(AxonFlowError, match="HTTP 404"):
            await client.get_budget_status("nope/alice")


def test_sync_sdk_reads_one_entity_of_a_per_entity_budget(sidecar: SidecarProcess) -> None:
    _record(sidecar, user_id="dave", cost_usd=1.5)
    with AxonFlow.sync(endpoint=sidecar.url) as client:
        status = client.get_budget_status("each-user/dave")
        assert (status.used_usd, status.remaining_usd, status.percentage) == (1.5, 0.5, 75.0)


# ---- AxonFlow.sync inside a running event loop -----------------------------------------------


async def test_sync_client_inside_a_running_loop_works_call_after_call(
    sidecar: SidecarProcess,
) -> None:
    """The second call used to fail with 'Event loop is closed' (gotchas.md)."""
    _record(sidecar, user_id="erin", cost_usd=0.5)
    with AxonFlow.sync(endpoint=sidecar.url) as client:
        for _ in range(5):
            assert client.get_budget_status("each-user/erin").used_usd == 0.5
        assert client.check_budget(BudgetCheckRequest(user_id="erin")).allowed is True
        assert len(client.list_budgets().budgets) == 3
        assert client.health_check() is True
        # The gateway pair, three times: each pre-check holds and each audit settles.
        for _ in range(3):
            approved = client.pre_check(
                user_token="", query="hi",
                context={"user_id": "erin", "provider": "openai", "model": "gpt-4o"},
            )  # fmt: skip
            audited = client.audit_llm_call(
                context_id=approved.context_id, response_summary="", provider="openai",
                model="gpt-4o", token_usage=TokenUsage(prompt_tokens=1000, completion_tokens=500,
                                                       total_tokens=1500),
                latency_ms=10,
            )  # fmt: skip
            assert audited.success is True
        # 0.5 + 3 x (1000 in, 500 out of gpt-4o: 0.0025 + 0.005)
        assert client.get_budget_status("each-user/erin").used_usd == pytest.approx(0.5225)


def _connection_header(port: int, method: str, path: str, headers: dict[str, str],
                       body: str | None = None) -> tuple[str | None, bool]:  # fmt: skip
    """(Connection header of the answer, whether a second request on the same connection
    was answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body, headers)
        first = conn.getresponse()
        first.read()
        answer = first.getheader("Connection")
        if first.will_close:
            return answer, False
        conn.request(method, path, body, headers)
        second = conn.getresponse()
        second.read()
        return answer, second.status < 500
    finally:
        conn.close()


def test_only_the_python_sdk_gets_connection_close(sidecar: SidecarProcess) -> None:
    port = sidecar.port
    json_headers = {"Content-Type": "application/json"}
    status = "/api/v1/budgets/org-monthly/status"
    # The SDK's requests, on its routes and on /health: closed after the answer, errors too.
    assert _connection_header(port, "GET", status, {**json_headers, **SDK_HEADERS}) == (
        "close", False)  # fmt: skip
    assert _connection_header(port, "GET", "/api/v1/budgets/nope", SDK_HEADERS) == (
        "close", False)  # fmt: skip
    assert _connection_header(port, "GET", "/health", SDK_HEADERS) == ("close", False)
    # Anyone else on the same routes keeps the connection (HTTP/1.1 default: no header).
    assert _connection_header(port, "GET", status, json_headers) == (None, True)
    # The native API keeps it, whoever calls.
    body = json.dumps({"user_id": "zed", "estimated_usd": 0.01})
    assert _connection_header(port, "POST", "/v1/check", {**json_headers, **SDK_HEADERS},
                              body) == (None, True)  # fmt: skip
    assert _connection_header(port, "POST", "/v1/check", json_headers, body) == (None, True)
