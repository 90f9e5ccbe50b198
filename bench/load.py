"""What every bench driver shares: wrk (the load generator, a separate C process) and
starting/stopping the processes it loads, each on 127.0.0.1 and stopped by its pid."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass, field
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
    # CPU per completed request, µs: (user, system) of each watched process and of wrk.
    cpu_us: dict[str, tuple[float, float]] = field(default_factory=dict)


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a running process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) * _TICK_S, int(fields[12]) * _TICK_S


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(
    url: str, script: Path, connections: int, seconds: int, watch: dict[str, int] | None = None
) -> WrkResult:
    """One wrk run. `watch`: name -> pid of processes whose CPU per request the result
    reports (cpu_us), beside wrk's own (from its rusage)."""
    before = {name: process_cpu_s(pid) for name, pid in (watch or {}).items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
    # communicate() reaped wrk: its CPU is what this process's reaped children gained (the
    # servers it started run on, unreaped, until they are stopped).
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    extra = next((line for line in out.splitlines() if line.startswith("PAIR")), "")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        extra += f" non-2xx={errors.group(1)}"
    cpu: dict[str, tuple[float, float]] = {}
    for name, pid in (watch or {}).items():
        (u0, s0), (u1, s1) = before[name], process_cpu_s(pid)
        cpu[name] = (1e6 * (u1 - u0) / requests, 1e6 * (s1 - s0) / requests)
    if watch:
        cpu["wrk"] = (
            1e6 * (reaped.ru_utime - children.ru_utime) / requests,
            1e6 * (reaped.ru_stime - children.ru_stime) / requests,
        )
    return WrkResult(rps, p50, p99, extra, requests, cpu)


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
