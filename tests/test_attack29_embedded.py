"""The embedded redis-server of `make run` (sidecar.embedded) on a data dir that stops
taking writes, or that holds a snapshot it would not read:

- its append-only file unwritable (a full disk; here `chattr +i`, which stops root too):
  Redis refuses every write (MISCONF); decisions answer by the fail mode, settles 503, one
  error line names the data dir, and all resumes (a line says so) once it is writable,
  with nothing charged twice or lost across a restart;
- a `dump.rdb` and no append-only file (a backup restored as the dump): read, not started
  empty beside it (Redis with appendonly on reads only the append-only file);
- a corrupt `dump.rdb`, or a corrupt append-only file: refused, the file named, nothing
  written over it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import yaml

from tests.harness import SidecarProcess, wait_until
from tests.test_attack29_disk import immutable, persistence
from tests.test_embedded_supervision import (
    CONFIG,
    GUARD_S,
    embedded,
    request,
    spend,
    used_usd,
    wait_ready,
)
from tests.test_embedded_supervision import config as config  # (a fixture)

MICRO = 1_000_000


def socket_client(data_dir: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5)


def micro(usd: float | None) -> int | None:
    return None if usd is None else round(usd * MICRO)


def test_an_unwritable_data_dir_answers_by_the_fail_mode_names_the_dir_and_recovers(
    config: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    sidecar = embedded(config, data)
    try:
        sidecar.start()
        wait_ready(sidecar)
        spend(sidecar, 0.25)
        status, held = request(
            sidecar.url + "/v1/authorize", {"org_id": "acme", "estimated_usd": 0.5}
        )
        assert status == 200 and held["allowed"], held
        aof = data / "appendonlydir"
        with socket_client(data) as client:
            with immutable(*sorted(aof.glob("*.incr.aof")), aof, data):
                # The write that finds the disk unwritable is answered (it is in memory and
                # kept for the file); every write after it is refused until it is written.
                client.set("disk-probe", "1")
                wait_until(
                    lambda: persistence(client)["aof_last_write_status"] == "err",
                    GUARD_S,
                    "the append-only write failed",
                )
                answers = [
                    request(sidecar.url + "/v1/authorize", {"org_id": "acme", "estimated_usd": 0.1})
                    for _ in range(5)
                ]
                settles = [
                    request(
                        sidecar.url + "/v1/settle",
                        {"reservation_id": held["reservation_id"], "cost_usd": 0.5},
                    )
                    for _ in range(3)
                ]
                wait_until(
                    lambda: "cannot write its data in" in sidecar.output(), GUARD_S, "the log line"
                )
            # Writable again: Redis writes what it kept, then takes writes (it retries each
            # second), and the watcher says so.
            wait_until(
                lambda: persistence(client)["aof_last_write_status"] == "ok",
                GUARD_S,
                "the append-only file written",
            )
            client.delete("disk-probe")
        assert [s for s, _ in answers] == [503] * 5
        assert all(b["degraded"] is True for _, b in answers), answers
        assert [s for s, _ in settles] == [503] * 3
        lines = [line for line in sidecar.output().splitlines() if "cannot write its data" in line]
        assert len(lines) == 1 and str(data) in lines[0] and "MISCONF" in lines[0], lines
        wait_until(lambda: "writes its data in" in sidecar.output(), GUARD_S, "resumed line")

        def settled() -> bool:
            status, body = request(
                sidecar.url + "/v1/settle",
                {"reservation_id": held["reservation_id"], "cost_usd": 0.5},
            )
            return status == 200 and body["state"] == "settled"

        wait_until(settled, GUARD_S, "the settle answered")
        assert micro(used_usd(sidecar)) == 750_000
        sidecar.stop()
        sidecar.start()  # the same data dir: nothing lost, nothing charged twice
        wait_ready(sidecar)
        assert micro(used_usd(sidecar)) == 750_000
        status, body = request(sidecar.url + "/v1/budgets/org/status?scope_id=acme")
        assert (status, micro(body["held_usd"])) == (200, 0)
    finally:
        sidecar.cleanup()


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A dump.rdb of an embedded Redis in which the org spent $0.25 (BGSAVE, as an
    operator's backup takes it)."""
    tmp = tmp_path_factory.mktemp("backup")
    cfg = tmp / "budgets.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    source = tmp / "source"
    sidecar = embedded(str(cfg), source)
    try:
        sidecar.start()
        wait_ready(sidecar)
        spend(sidecar, 0.25)
        with socket_client(source) as client:
            before = persistence(client)["rdb_last_save_time"]
            client.bgsave()
            wait_until(
                lambda: (
                    persistence(client)["rdb_bgsave_in_progress"] == 0
                    and persistence(client)["rdb_last_save_time"] != before
                ),
                GUARD_S,
                "the BGSAVE",
            )
            assert persistence(client)["rdb_last_bgsave_status"] == "ok"
    finally:
        sidecar.cleanup()
    return (source / "dump.rdb").read_bytes()


def test_a_dump_rdb_without_an_append_only_file_is_read_not_started_empty(
    config: str, tmp_path: Path, backup: bytes
) -> None:
    """Only the backup's dump.rdb in a fresh data dir: the spend in it is there, and still
    there after a restart (it went into the append-only file)."""
    data = tmp_path / "restored"
    data.mkdir()
    (data / "dump.rdb").write_bytes(backup)
    sidecar = embedded(config, data)
    try:
        sidecar.start()
        wait_ready(sidecar)
        assert micro(used_usd(sidecar)) == 250_000
        assert "read" in sidecar.output() and str(data / "dump.rdb") in sidecar.output()
        spend(sidecar, 0.25)
        sidecar.stop()
        sidecar.start()
        wait_ready(sidecar)
        assert micro(used_usd(sidecar)) == 500_000
    finally:
        sidecar.cleanup()


def refused(sidecar: SidecarProcess) -> str:
    """The output of a sidecar that must refuse to start (exit 1)."""
    with pytest.raises(RuntimeError, match="exited with 1") as failed:
        sidecar.start()
    assert sidecar.process is not None and sidecar.process.wait(timeout=GUARD_S) == 1
    return str(failed.value)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "not an rdb"])
def test_a_corrupt_dump_rdb_is_refused_with_the_file_named(
    config: str, tmp_path: Path, backup: bytes, damage: str
) -> None:
    data = tmp_path / "damaged"
    data.mkdir()
    raw = backup
    bad = {
        "flipped": raw[:9] + bytes(b ^ 0xFF for b in raw[9:29]) + raw[29:],
        "truncated": raw[: len(raw) // 2],
        "not an rdb": b"not a snapshot\n" * 10,
    }[damage]
    (data / "dump.rdb").write_bytes(bad)
    sidecar = embedded(config, data)
    try:
        output = refused(sidecar)
        assert f"reading {data / 'dump.rdb'}" in output, output
        assert "not started empty" in output, output
        assert (data / "dump.rdb").read_bytes() == bad  # untouched
        assert not (data / "appendonlydir").exists()  # no empty store made beside it
    finally:
        sidecar.cleanup()


def test_a_corrupt_append_only_file_is_refused_with_the_file_named(
    config: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    sidecar = embedded(config, data)
    try:
        sidecar.start()
        wait_ready(sidecar)
        spend(sidecar, 0.25)
        sidecar.stop()
        (incr,) = sorted((data / "appendonlydir").glob("*.incr.aof"))
        incr.write_bytes(incr.read_bytes() + b"*3\r\n$3\r\nSET\r\nnot RESP\r\n")
        damaged = incr.read_bytes()
        output = refused(sidecar)
        assert incr.name in output and "append only file" in output, output
        assert incr.read_bytes() == damaged
    finally:
        sidecar.cleanup()
