"""What every bench driver shares: wrk (the load generator, a separate C process) and
starting/stopping the processes it loads, each on 127.0.0.1 and stopped by its pid."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.harness import REPO, wait_answering

BENCH = Path(__file__).resolve().parent


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    extra: str = ""
    requests: int = 0  # completed in the run (wrk's "N requests in")


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: Path, connections: int, seconds: int) -> WrkResult:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    extra = next((line for line in out.splitlines() if line.startswith("PAIR")), "")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        extra += f" non-2xx={errors.group(1)}"
    return WrkResult(rps, p50, p99, extra, requests)


def start(cmd: list[str], url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answering(proc, url, timeout_s=30, what=" ".join(cmd))
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def sidecar_cmd(port: int, redis_url: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "serve", "--port", str(port),
            "--redis-url", redis_url, "--config", str(config), "--log-level", "warning",
            *extra]  # fmt: skip


def warm_up(base: str) -> None:
    """One second of authorize: caches, memo and connections filled before a measured run."""
    wrk(base + "/v1/authorize", BENCH / "wrk_authorize.lua", 64, 1)
