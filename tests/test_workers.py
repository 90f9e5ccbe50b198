"""`serve --workers N`: N processes on one port (SO_REUSEPORT) that share Redis, add up in
/metrics, keep the no-overshoot invariant between them, and stop together on SIGTERM."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness import RedisServer, SidecarProcess, wait_until

pytestmark = pytest.mark.slow

CAP = {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                    "period": "monthly", "on_exceed": "block"}]}  # fmt: skip
BIG = {"budgets": [{"id": "big", "name": "Big", "scope": "organization", "limit_usd": 1000.0,
                    "period": "monthly"}]}  # fmt: skip


def _post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The decoded body and the X-Sidecar-Worker header (a new connection each time, so
    the kernel spreads the calls over the workers)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r), r.headers.get("X-Sidecar-Worker", "")


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        text: str = r.read().decode()
        return text


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            key, _, number = line.rpartition(" ")
            got = ",".join(sorted(key[len(name) + 1 : -1].split(",")))
            if got == want:
                return float(number)
    raise AssertionError(f"no sample {name}{{{want}}}")


def _both_workers(url: str) -> tuple[set[str], int]:
    """Decide until two workers have answered (the second may still be starting)."""
    seen: set[str] = set()
    decisions = 0
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        decision, worker = _post(url + "/v1/authorize", {"estimated_usd": 0.01})
        assert decision["allowed"] is True
        seen.add(worker)
        decisions += 1
        if decisions % 20 == 0:
            time.sleep(0.1)  # the second worker is still starting: let it
    return seen, decisions


def test_two_workers_share_the_port_and_metrics_add_up(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    sidecar = SidecarProcess(redis_server.url, str(write_config(BIG)), args=["--workers", "2"])
    try:
        sidecar.start()
        seen, decisions = _both_workers(sidecar.url)
        assert len(seen) == 2 and all(w.isdigit() for w in seen), seen
        more = 7
        for _ in range(more):
            _post(sidecar.url + "/v1/check", {"estimated_usd": 0.01})
        # Each scrape lands on either worker; every one of them shows the sum of both.
        for _ in range(4):
            text = _get_text(sidecar.url + "/metrics")
            name = "budget_sidecar_decisions_total"
            labels = {"action": "allow", "outcome": "allowed"}
            assert _sample(text, name, operation="authorize", **labels) == decisions
            assert _sample(text, name, operation="check", **labels) == more
            assert _sample(text, "budget_sidecar_reservations_total", event="held") == decisions
        status, _ = _get_json(sidecar.url + "/v1/budgets/big/status")
        assert status["held_usd"] == decisions * 10_000 / 1_000_000  # micro-USD, exact
    finally:
        sidecar.cleanup()


def _get_json(url: str) -> tuple[dict[str, Any], str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r), r.headers.get("X-Sidecar-Worker", "")


def test_no_overshoot_across_workers(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    sidecar = SidecarProcess(redis_server.url, str(write_config(CAP)), args=["--workers", "2"])
    try:
        sidecar.start()
        # Both workers up first (with 0-cost checks, which hold nothing).
        wait_until(
            lambda: len({_post(sidecar.url + "/v1/check", {"estimated_usd": 0})[1]
                         for _ in range(40)}) == 2,
            timeout_s=30, what="both workers answering",
        )  # fmt: skip
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(
                pool.map(
                    lambda _: _post(sidecar.url + "/v1/authorize", {"estimated_usd": 0.03}),
                    range(80),
                )
            )
        granted = [d for d, _ in answers if d["allowed"]]
        # $1 / $0.03: exactly 33 holds fit, whichever worker took them.
        assert len(granted) == 33
        assert len({w for _, w in answers}) == 2
        status, _ = _get_json(sidecar.url + "/v1/budgets/cap/status")
        assert (status["held_usd"], status["used_usd"]) == (0.99, 0.0)
    finally:
        sidecar.cleanup()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_sigterm_stops_every_worker_and_the_embedded_redis(
    tmp_path: Path, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    data = tmp_path / "data"
    sidecar = SidecarProcess(
        None, str(write_config(BIG)), args=["--workers", "2", "--data-dir", str(data)]
    )
    try:
        sidecar.start()
        seen, _ = _both_workers(sidecar.url)
        workers = [int(w) for w in seen]
        assert len(workers) == 2
        metrics_dir = Path(_environ(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()
        socket_path = data / "redis.sock"
        assert redis.Redis(unix_socket_path=str(socket_path)).ping()
        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=30) == 0
        assert [pid for pid in workers if _running(pid)] == []
        with pytest.raises((redis.RedisError, OSError)):
            redis.Redis(unix_socket_path=str(socket_path), socket_timeout=0.5).ping()
        # The metrics directory the supervisor made for the workers is gone.
        assert not metrics_dir.exists()
        with pytest.raises(urllib.error.URLError):
            _get_json(sidecar.url + "/healthz")
    finally:
        sidecar.cleanup()
