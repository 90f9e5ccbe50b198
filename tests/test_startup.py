"""A clear start-up: a port in use is one line naming the address and a non-zero exit
(nothing claims to listen first, no traceback); the start-up line names the Redis URL with
its password masked; an unreachable Redis is named at once; a Redis that stays away does
not flood the log."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar.log_throttle import Throttle
from tests.harness import REPO, RedisServer, SidecarProcess, free_port, wait_until


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", *args],
        env={**full, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("store", ["url", "embedded"])
def test_a_port_in_use_is_one_line_and_a_non_zero_exit(
    busy_port: int, tmp_path: Path, redis_server: RedisServer, workers: int, store: str
) -> None:
    args = ["--port", str(busy_port), "--workers", str(workers)]
    if store == "url":
        args += ["--redis-url", redis_server.url]
    done = serve(args, {"SIDECAR_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot listen on http://127.0.0.1:{busy_port}" in lines[0]
    assert "in use" in lines[0]
    # Nothing was started for it: no embedded Redis left a socket behind.
    assert not (tmp_path / "data" / "redis.sock").exists()


def test_the_start_up_line_names_the_redis_url_with_the_password_masked(
    redis_server: RedisServer,
) -> None:
    with redis_server.client() as client:
        client.config_set("requirepass", "s3cret-pw")
    sidecar = SidecarProcess(f"redis://:s3cret-pw@127.0.0.1:{redis_server.port}/0", None)
    try:
        sidecar.start()
        wait_until(lambda: "listening" in sidecar.output(), what="the start-up line")
        out = sidecar.output()
        line = next(line for line in out.splitlines() if "listening" in line)
        assert f"http://127.0.0.1:{sidecar.port}" in line
        assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in line
        assert "s3cret-pw" not in out
        assert "unreachable" not in out  # it is reachable, with that password
    finally:
        sidecar.cleanup()
        with redis.Redis(port=redis_server.port, password="s3cret-pw") as client:
            client.config_set("requirepass", "")


def test_an_unreachable_redis_is_named_at_start_up_and_does_not_flood_the_log() -> None:
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    sidecar = SidecarProcess(url, None)
    try:
        sidecar.start()
        wait_until(lambda: "unreachable" in sidecar.output(), what="the warning")
        time.sleep(2.5)  # the definitions poll tries every 0.5 s meanwhile
        out = sidecar.output()
        named = [line for line in out.splitlines() if "unreachable" in line]
        assert len(named) == 1 and "redis://:***@127.0.0.1:" in named[0], named
        assert "pw@" not in out
        # One definitions warning, the others counted for the next one (10 s later).
        assert out.count("cannot read definitions from redis") == 1, out
    finally:
        sidecar.cleanup()


def test_the_throttle_lets_one_repeated_warning_through_per_window() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0], loggers=frozenset({"sidecar.x"}))

    def record(level: int, msg: str, *args: object, name: str = "sidecar.x") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    passed = []
    for second in range(25):
        now[0] = float(second)
        r = record(logging.WARNING, "cannot reach %s", "redis")
        if throttle.filter(r):
            passed.append((second, r.getMessage()))
        # Another template has its own window; errors and other loggers are let through.
        assert throttle.filter(record(logging.WARNING, "other %d", second)) is (second % 10 == 0)
        assert throttle.filter(record(logging.ERROR, "restarted %d", second))
        assert throttle.filter(record(logging.WARNING, "cannot reach %s", "x", name="other"))
    assert passed == [
        (0, "cannot reach redis"),
        (10, "cannot reach redis (9 similar suppressed in the last 10 s)"),
        (20, "cannot reach redis (9 similar suppressed in the last 10 s)"),
    ]
