"""CPU instructions per request, counted by valgrind (callgrind), for the bare endpoint and
the sidecar's authorize: a figure that does not move with the machine's load.

Wall-clock throughput on the shared 2-core machine moves 20-30% from run to run; the
instructions a server executes per request do not (callgrind counts them, whatever else
runs). Their ratio, bare / sidecar, is what `authorize / bare POST throughput` would be
if the server process alone set the pace. The server runs ~50x slower under valgrind, so
this takes about a minute; `make bench ARGS=--instructions` runs it after the wrk figures.

Each server gets a warm-up, then its counters are zeroed, then exactly N requests are sent
over 64 keep-alive connections by the client below, then the counters are dumped. The
sidecar's idle work (definitions and webhook polls) is measured for 10 s and subtracted.
"""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import REPO, RedisServer, free_port, stop_process, wait_answering

BODY = (
    b'{"org_id":"org-1","team_id":"team-1","user_id":"user-1","provider":"openai",'
    b'"model":"gpt-4o","estimated_tokens_in":500,"estimated_tokens_out":200,"lease_ms":600000}'
)


async def _send(port: int, path: str, count: int, connections: int) -> int:
    """POST BODY `count` times over `connections` keep-alive connections; the non-200s."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    left, bad = count, 0

    async def one() -> None:
        nonlocal left, bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(head + BODY)
            bad += b" 200 " not in await reader.readline()
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(connections)))
    return bad


def _total(out_prefix: str, pid: int) -> int:
    """The instruction total of the newest dump of `pid`, and remove the dumps."""
    files = sorted(glob.glob(f"{out_prefix}.{pid}*"), key=os.path.getmtime)
    for line in Path(files[-1]).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
            break
    else:
        raise RuntimeError(f"no totals in {files[-1]}")
    for f in files:
        os.unlink(f)
    return total


def _control(option: str, pid: int, value: str | None = None) -> None:
    opt = option if value is None else f"{option}={value}"
    subprocess.run(["callgrind_control", opt, str(pid)], check=True, capture_output=True)


def count(cmd: list[str], port: int, ready: str, requests: int, idle_s: float = 10.0) -> float:
    """Instructions per request of the server `cmd` (listening on `port`)."""
    workdir = tempfile.mkdtemp(prefix="bs-callgrind-")
    prefix = f"{workdir}/cg"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p", *cmd],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_answering(proc, ready, timeout_s=300, what="server under valgrind")
        asyncio.run(_send(port, "/v1/authorize", 500, 64))  # warm-up
        _control("-z", proc.pid)
        time.sleep(idle_s)
        _control("-d", proc.pid)
        idle_per_s = _total(prefix, proc.pid) / idle_s
        _control("-z", proc.pid)
        start = time.monotonic()
        bad = asyncio.run(_send(port, "/v1/authorize", requests, 64))
        elapsed = time.monotonic() - start
        _control("-d", proc.pid)
        if bad:
            raise RuntimeError(f"{bad} of {requests} requests were not 200")
        return (_total(prefix, proc.pid) - idle_per_s * elapsed) / requests
    finally:
        stop_process(proc)
        for leftover in glob.glob(f"{prefix}.*"):
            os.unlink(leftover)
        os.rmdir(workdir)


def measure(config: Path, requests: int = 2000) -> dict[str, float]:
    server = RedisServer().start()
    try:
        port = free_port()
        bare = count(
            [sys.executable, "-m", "bench.bare", "--port", str(port)],
            port,
            f"http://127.0.0.1:{port}/",
            requests,
            idle_s=2.0,
        )
        port = free_port()
        sidecar = count(
            [sys.executable, "-m", "sidecar", "serve", "--port", str(port), "--redis-url",
             server.url, "--config", str(config), "--log-level", "warning"],
            port,
            f"http://127.0.0.1:{port}/healthz",
            requests,
        )  # fmt: skip
    finally:
        server.cleanup()
    return {"bare_instructions_per_request": bare, "authorize_instructions_per_request": sidecar}
