"""`budget-sidecar serve`: the embedded persistent redis-server, and settings from the
environment (SIDECAR_HOST, SIDECAR_PORT, SIDECAR_CONFIG, REDIS_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.harness import REPO, RedisServer, free_port, wait_until

DOC = {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                    "period": "monthly"}]}  # fmt: skip


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        result: dict[str, Any] = json.load(r)
        return result


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        result: dict[str, Any] = json.load(r)
        return result


def serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve"], env={**full, **env}, cwd=REPO,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert proc.poll() is None, "sidecar exited"
        try:
            return bool(get(url + "/readyz")["ready"])
        except OSError:
            return False

    wait_until(up, timeout_s=30, what="sidecar ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def test_embedded_redis_persists_across_restarts(
    tmp_path: Path, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {
        "SIDECAR_PORT": str(port),
        "SIDECAR_CONFIG": str(write_config(DOC)),
        "SIDECAR_DATA_DIR": str(data),
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"

    proc = serve(env, log)
    try:
        wait_up(url, proc)
        decision = post(url + "/v1/authorize", {"estimated_usd": 0.3})
        settled = post(url + "/v1/settle", {"reservation_id": decision["reservation_id"],
                                             "cost_usd": 0.25})  # fmt: skip
        assert settled["budgets"][0]["used_usd"] == 0.25
    finally:
        stop(proc)
    text = log.read_text()
    assert "embedded redis-server" in text and str(data) in text and "REDIS_URL" in text
    # The embedded server stopped with the sidecar: nothing answers on its socket.
    socket_path = data / "redis.sock"
    try:
        alive = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        alive = False
    assert not alive
    assert (data / "appendonlydir").is_dir()

    proc = serve(env, log)
    try:
        wait_up(url, proc)
        status = get(url + "/v1/budgets/cap/status")
        assert (status["used_usd"], status["held_usd"]) == (0.25, 0.0)
    finally:
        stop(proc)


def test_settings_from_environment(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:  # fmt: skip
    port = free_port()
    env = {
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "SIDECAR_CONFIG": str(write_config(DOC)),
        "REDIS_URL": redis_server.url,
    }
    proc = serve(env, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc)
        post(url + "/v1/authorize", {"estimated_usd": 0.5})
        # The hold went to the Redis named by REDIS_URL, not to an embedded one.
        assert redis_client.hgetall("bs:{default}:ctr") == {
            next(iter(redis_client.hkeys("bs:{default}:ctr"))): "500000"
        }
        assert "embedded" not in (tmp_path / "serve.log").read_text()
    finally:
        stop(proc)
