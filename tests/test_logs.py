"""Structured logs: JSON lines, a debug line per decision with the request id, errors at
error level."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar import logs
from tests.harness import RedisServer, SidecarProcess

DOC = {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                    "period": "monthly"}]}  # fmt: skip


def test_json_formatter_fields() -> None:
    stream = io.StringIO()
    logs.setup("debug", stream)
    try:
        token = logs.REQUEST_ID.set("req-1")
        try:
            logging.getLogger("sidecar.test").warning("hello %s", "world", extra={"k": 3})
        finally:
            logs.REQUEST_ID.reset(token)
        logging.getLogger("sidecar.test").error("no id", extra={"request_id": "req-2"})
    finally:
        logs.setup("warning", io.StringIO())
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["ts"].endswith("Z")
    del first["ts"], second["ts"]
    assert first == {"level": "warning", "logger": "sidecar.test", "msg": "hello world",
                     "request_id": "req-1", "k": 3}  # fmt: skip
    assert second == {"level": "error", "logger": "sidecar.test", "msg": "no id",
                      "request_id": "req-2"}  # fmt: skip


def _post(url: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-ID": request_id},
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.headers["X-Request-ID"] == request_id
        result: dict[str, Any] = json.load(r)
        return result


@pytest.mark.slow
@pytest.mark.parametrize("level", ["debug", "info"])
def test_one_debug_line_per_decision(
    level: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    sidecar = SidecarProcess(redis_server.url, str(write_config(DOC)),
                             args=["--log-level", level])  # fmt: skip
    try:
        sidecar.start()
        if level == "debug":
            _post(sidecar.url + "/v1/authorize", {"estimated_usd": 0.25}, "agent-42-step-1")
            _post(sidecar.url + "/v1/authorize", {"estimated_usd": 5.0}, "agent-42-step-2")
        else:
            request = urllib.request.Request(
                sidecar.url + "/v1/check",
                data=b"{}",
                headers={"X-Request-ID": "r", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as r:
                assert "X-Request-ID" not in r.headers  # no request-id middleware at info
    finally:
        sidecar.stop()
        output = sidecar.output()
        sidecar.cleanup()
    lines = [json.loads(line) for line in output.splitlines()]  # every line is JSON
    decisions = [line for line in lines if line["logger"] == "sidecar.decision"]
    if level == "info":
        assert decisions == []
        return
    assert [(d["request_id"], d["allowed"], d["action"], d["level"]) for d in decisions] == [
        ("agent-42-step-1", True, "allow", "debug"),
        ("agent-42-step-2", False, "block", "debug"),
    ]
    assert decisions[1]["budget_id"] == "cap"
