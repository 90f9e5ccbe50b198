"""Durability of the embedded Redis (no REDIS_URL: append-only file, fsync every second).

`budget-sidecar serve` settles a known series of charges for a few seconds; then the
embedded redis-server and the sidecar are killed with SIGKILL, and a new sidecar starts on
the same data directory. What the budget reads after the restart must be:

- exactly the sum of a prefix of the series (the append-only file replays in order: no
  charge is invented, duplicated, or survives without the ones before it), and
- at least every settle answered more than LOSS_BOUND_S before the kill.

LOSS_BOUND_S is `appendfsync everysec`'s promise (1 s) plus 1 s of margin: Redis postpones
a write while a background fsync is still running, for up to 2 s. A killed *process*
loses less than that: Redis writes the file before it answers, so an answered settle is
in the page cache and survives a SIGKILL; the one-second window is what a host crash
(power loss, kernel panic) can take. The test prints the measured loss and recovery time.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.harness import SidecarProcess, redis_binary, wait_until

LOSS_BOUND_S = 2.0
RUN_S = 3.0
CONFIG: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "scope_id": "acme",
                 "limit_usd": 100_000, "period": "monthly", "on_exceed": "block"}]
}  # fmt: skip


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def redis_pid(data_dir: Path) -> int:
    """The process id of the embedded redis-server of this data directory, as it says."""
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5)
    try:
        info = client.info("server")
    finally:
        client.close()
    return int(info["process_id"])


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its orphan reaper counts: it holds no file)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def used_micro(sidecar: SidecarProcess) -> int:
    status = get(f"{sidecar.url}/v1/budgets/org/status")
    # The calls ran one at a time, so the lost last second may end between one authorize
    # and its settle: that one hold (its lease returns it) and no other.
    assert status["held_usd"] in (0, 0.01), status
    return round(status["used_usd"] * 1_000_000)


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    redis_binary()  # skip locally / fail in CI without one
    data_dir = tmp_path / "data"
    config = tmp_path / "budgets.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {"SIDECAR_DATA_DIR": str(data_dir)}

    first = SidecarProcess(None, str(config), extra_env=env).start()
    restarted: SidecarProcess | None = None
    server_pid = 0
    try:
        wait_until(lambda: get(f"{first.url}/readyz")["ready"], what="embedded redis ready")
        server_pid = redis_pid(data_dir)
        # Distinct costs (1..9 thousandths of a cent...) so a prefix sum names its length.
        charged: list[tuple[float, int]] = []  # (answered at, micro-USD)
        end = time.monotonic() + RUN_S
        i = 0
        while time.monotonic() < end:
            micro = 1000 + (i % 9) * 10 + 1
            held = post(f"{first.url}/v1/authorize", {"org_id": "acme", "estimated_usd": 0.01})
            assert held["allowed"], held
            settled = post(
                f"{first.url}/v1/settle",
                {"reservation_id": held["reservation_id"], "cost_usd": micro / 1_000_000},
            )
            assert settled["state"] == "settled", settled
            charged.append((time.monotonic(), micro))
            i += 1
        killed_at = time.monotonic()
        os.kill(server_pid, signal.SIGKILL)
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        wait_until(lambda: gone(server_pid), what="redis-server gone")

        started = time.monotonic()
        restarted = SidecarProcess(None, str(config), extra_env=env).start()
        used = used_micro(restarted)
        recovery_s = time.monotonic() - started
        assert redis_pid(data_dir) != server_pid
    finally:
        first.cleanup()
        if restarted is not None:
            restarted.cleanup()
        # The new sidecar stops its embedded redis-server; make sure no orphan stays.
        if server_pid and not gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)

    prefix = [0]
    for _, micro in charged:
        prefix.append(prefix[-1] + micro)
    assert used in prefix, (used, prefix[-1])
    kept = prefix.index(used)
    must_keep = sum(1 for at, _ in charged if at < killed_at - LOSS_BOUND_S)
    assert kept >= must_keep, (kept, must_keep, len(charged))
    lost = len(charged) - kept
    window_s = killed_at - charged[kept][0] if lost else 0.0
    print(
        f"\nsettled {len(charged)} in {RUN_S}s; after kill -9: kept {kept}, lost {lost} "
        f"(the last {window_s:.3f}s); restart to first answer {recovery_s:.2f}s"
    )
