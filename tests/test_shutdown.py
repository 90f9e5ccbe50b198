"""Graceful shutdown: SIGTERM turns /readyz false first, requests in flight finish within
the shutdown timeout (their holds are answered and can be settled), and a request that
never completes is cut at the timeout without taking a hold."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness import RedisServer, SidecarProcess, wait_until

pytestmark = pytest.mark.slow

CAP = {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                    "period": "monthly", "on_exceed": "block"}]}  # fmt: skip
AUTHORIZE = json.dumps({"estimated_usd": 0.3}).encode()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        result: dict[str, Any] = json.load(r)
        return result


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _start_slow_authorize(port: int) -> socket.socket:
    """A connection whose authorize is being handled but whose body is not sent yet.

    A first request proves the server accepted the connection; `Expect: 100-continue` is
    answered from inside the request's handler task, so once it arrives the request is in
    flight (and not an idle keep-alive connection that shutdown closes at once). aiohttp
    reads nothing more once shutdown starts: this body never arrives."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b'"alive"' in _read_until(sock, b'"alive"}')
    sock.sendall(
        b"POST /v1/authorize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: " + str(len(AUTHORIZE)).encode() + b"\r\n\r\n"
    )
    assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
    return sock


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


# The decision's call, blocked by the pause: FCALL (Redis 7), EVALSHA (6.2), or the load of
# the function library its first FCALL found missing.
_DECISION_CALLS = ("fcall", "evalsha", "function|load")


def _evalsha_waiting(client: redis.Redis) -> bool:
    return any(c["cmd"] in _DECISION_CALLS and "b" in c["flags"] for c in client.client_list())


def test_a_request_in_flight_at_sigterm_completes_and_settles(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    # Redis answers slowly (paused): the authorize is in flight, waiting for its script.
    doc = {**CAP, "settings": {"redis_timeout_ms": 60_000}}
    cfg = str(write_config(doc))
    first = SidecarProcess(redis_server.url, cfg, args=["--shutdown-timeout", "60"])
    second = SidecarProcess(redis_server.url, cfg)
    try:
        first.start()
        redis_client.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        sock = socket.create_connection(("127.0.0.1", first.port), timeout=30)
        sock.sendall(
            b"POST /v1/authorize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(AUTHORIZE)).encode() + b"\r\n\r\n" + AUTHORIZE
        )
        wait_until(lambda: _evalsha_waiting(redis_client), timeout_s=20, what="evalsha paused")
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        # Shutdown has begun: no new connections; the request in flight still waits.
        wait_until(lambda: _refuses(first.port), timeout_s=20, what="listener closed")
        redis_client.execute_command("CLIENT", "UNPAUSE")
        answer = _read_to_eof(sock)
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        decision = json.loads(body)
        assert decision["allowed"] is True and decision["budgets"][0]["held_usd"] == 0.3
        assert first.process.wait(timeout=20) == 0

        # The hold it answered exists, and another sidecar settles it.
        second.start()
        settled = _post(
            second.url + "/v1/settle",
            {"reservation_id": decision["reservation_id"], "cost_usd": 0.2},
        )
        assert settled["state"] == "settled"
        with urllib.request.urlopen(second.url + "/v1/budgets/cap/status", timeout=10) as r:
            status = json.load(r)
        assert (status["used_usd"], status["held_usd"]) == (0.2, 0.0)
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
        first.cleanup()
        second.cleanup()


def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_readiness_turns_false_first_while_requests_are_still_served(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    sidecar = SidecarProcess(
        redis_server.url, str(write_config(CAP)), args=["--drain-seconds", "120"]
    )
    try:
        sidecar.start()
        assert _readyz(sidecar.url) == (200, {"ready": True, "redis": "ok"})
        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _readyz(sidecar.url)[0] == 503, timeout_s=20, what="unready")
        assert _readyz(sidecar.url) == (503, {"ready": False, "draining": True})
        # Draining: still deciding (callers that have not noticed yet are served).
        assert _post(sidecar.url + "/v1/authorize", {"estimated_usd": 0.25})["allowed"] is True
        # A second signal ends the drain at once.
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=20) == 0
    finally:
        sidecar.cleanup()


def test_a_request_that_never_completes_is_cut_at_the_timeout_without_a_hold(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    sidecar = SidecarProcess(
        redis_server.url, str(write_config(CAP)), args=["--shutdown-timeout", "1"]
    )
    try:
        sidecar.start()
        sock = _start_slow_authorize(sidecar.port)
        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=20) == 0
        # The connection was closed without an answer, and nothing was held.
        assert b"HTTP/1.1 200" not in _read_to_eof(sock)
        sock.close()
        assert redis_client.hgetall("bs:{default}:ctr") == {}
    finally:
        sidecar.cleanup()
