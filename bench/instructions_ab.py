"""A/B of the sidecar's CPU instructions per authorize and per settle, by valgrind
(callgrind), between source trees, in one run with the trees alternating by round.

    .venv/bin/python -m bench.instructions_ab DIR_A DIR_B [--rounds 3] [--requests 1000]

Each DIR is a checkout of the project (e.g. `git archive COMMIT | tar -x -C DIR`); its
sidecar runs with DIR as the working directory, so `python -m sidecar` imports DIR's code.
Naming the same DIR twice measures the noise. Per round and tree: a sidecar under
callgrind on bench.run's CONFIG, a warm-up of authorizes and their settles, the idle work
for `--idle` seconds (subtracted), then `--requests` authorizes (64 connections), then the
settles of those reservations (64 connections), each counted on its own. Prints each
figure and the mean per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import instructions
from bench.run import CONFIG
from tests.harness import RedisServer, free_port, stop_process, wait_answering

AUTHORIZE = instructions.BODY
_RID = re.compile(rb'"reservation_id":"([0-9a-f]+)"')


async def _post(port: int, path: str, bodies: list[bytes], connections: int) -> list[bytes]:
    """POST each of `bodies` over `connections` keep-alive connections; the answers'
    bodies, and an error on any non-200."""
    todo = list(reversed(bodies))
    answers: list[bytes] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while todo:
            body = todo.pop()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"{path}: {status!r} {answer!r}")
            answers.append(answer)
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(connections)))
    return answers


def _settles(answers: list[bytes]) -> list[bytes]:
    bodies = []
    for answer in answers:
        found = _RID.search(answer)
        if found is None:
            raise RuntimeError(f"no reservation in {answer!r}")
        rid = found.group(1).decode()
        bodies.append(f'{{"reservation_id":"{rid}","tokens_in":450,"tokens_out":180}}'.encode())
    return bodies


def one_run(
    tree: Path, redis_url: str, config: Path, requests: int, idle_s: float
) -> dict[str, float]:
    """Instructions per authorize and per settle of the sidecar of `tree`."""
    workdir = tempfile.mkdtemp(prefix="bs-ab-")
    prefix = f"{workdir}/cg"
    port = free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no",
         f"--callgrind-out-file={prefix}.%p",
         sys.executable, "-m", "sidecar", "serve", "--port", str(port), "--redis-url",
         redis_url, "--config", str(config), "--log-level", "warning"],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_answering(proc, f"http://127.0.0.1:{port}/healthz", timeout_s=300, what="sidecar")
        # Start-up runs uninstrumented (several times faster); counting starts here.
        instructions._control("--instr", proc.pid, "on")
        warm = asyncio.run(_post(port, "/v1/authorize", [AUTHORIZE] * 500, 64))
        asyncio.run(_post(port, "/v1/settle", _settles(warm), 64))
        instructions._control("-z", proc.pid)
        time.sleep(idle_s)
        instructions._control("-d", proc.pid)
        idle_per_s = instructions._total(prefix, proc.pid) / idle_s
        figures = {}
        settles: list[bytes] = []
        for name, path in (("authorize", "/v1/authorize"), ("settle", "/v1/settle")):
            bodies = [AUTHORIZE] * requests if name == "authorize" else settles
            instructions._control("-z", proc.pid)
            start = time.monotonic()
            answers = asyncio.run(_post(port, path, bodies, 64))
            elapsed = time.monotonic() - start
            instructions._control("-d", proc.pid)
            total = instructions._total(prefix, proc.pid)
            figures[name] = (total - idle_per_s * elapsed) / requests
            if name == "authorize":
                settles = _settles(answers)
        return figures
    finally:
        stop_process(proc)
        for leftover in Path(workdir).glob("cg.*"):
            leftover.unlink()
        Path(workdir).rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=5.0)
    args = parser.parse_args()
    config = Path(tempfile.mkdtemp(prefix="bs-ab-cfg-")) / "bench.yaml"
    config.write_text(CONFIG)
    results: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(args.trees))}
    server = RedisServer().start()
    try:
        for r in range(args.rounds):
            for i, tree in enumerate(args.trees):
                figures = one_run(tree.resolve(), server.url, config, args.requests, args.idle)
                results[i].append(figures)
                print(
                    f"round {r} {i}:{tree}: authorize {figures['authorize']:,.0f}"
                    f" settle {figures['settle']:,.0f}",
                    flush=True,
                )
    finally:
        server.cleanup()
    for i, tree in enumerate(args.trees):
        runs = results[i]
        a = statistics.mean(f["authorize"] for f in runs)
        s = statistics.mean(f["settle"] for f in runs)
        print(f"mean {i}:{tree}: authorize {a:,.0f} settle {s:,.0f} ({len(runs)} rounds)")


if __name__ == "__main__":
    main()
