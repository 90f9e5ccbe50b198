"""CPU instructions per authorize and per settle of the decision in process (callgrind):
the Engine with its real RESP store on a real redis-server, Metrics as its events, the
request decoded and the answer encoded by msgspec as the native routes do; no HTTP.

    .venv/bin/python -m bench.instructions_engine [TREE ...] [--requests 1000]

Each TREE (default: this checkout) is a checkout of the project; its code runs (a
subprocess with TREE as its working directory, under valgrind). The same tree twice
measures the noise: about 1k instructions here, where the whole-server counts of
bench.instructions_ab moved by over 10% between runs of one build on the shared machine.
Start-up runs uninstrumented; the process switches callgrind on itself, warms up, then
counts `--requests` authorizes (50 at a time) and then their settles.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness import RedisServer

SETTLE = b'{"reservation_id":"%s","tokens_in":450,"tokens_out":180}'


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def _dumped(prefix: str) -> int:
    files = sorted(glob.glob(prefix + "*"), key=os.path.getmtime)
    total = 0
    for line in Path(files[-1]).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
            break
    for f in files:
        os.unlink(f)
    return total


async def _count(url: str, requests: int, prefix: str) -> tuple[float, float]:
    """(instructions per authorize, per settle), in this process (under callgrind)."""
    import msgspec
    import yaml

    from bench.instructions import BODY
    from bench.run import CONFIG
    from sidecar.api import native
    from sidecar.clock import SystemClock
    from sidecar.config import parse
    from sidecar.engine import Engine
    from sidecar.metrics import Metrics
    from sidecar.schemas import AuthorizeRequest, SettleRequest
    from sidecar.scripts import Scripts
    from sidecar.store import open_store

    # Valgrind is ~50x slower: a Redis timeout no reply misses.
    doc = yaml.safe_load(CONFIG.replace("redis_timeout_ms: 1000", "redis_timeout_ms: 60000"))
    cfg = parse(doc, "<bench>")
    metrics = Metrics()
    store = metrics.wrap(open_store(url, timeout_ms=60_000))
    engine = Engine(cfg, store, SystemClock(), Scripts.load_all(), events=metrics)
    authorize_body = msgspec.json.Decoder(AuthorizeRequest)
    settle_body = msgspec.json.Decoder(SettleRequest)

    async def authorize() -> str:
        decision = await engine.authorize("default", authorize_body.decode(BODY))
        native._encode(decision)
        assert decision.reservation_id is not None
        return decision.reservation_id

    async def settle(rid: str) -> None:
        result = await engine.settle("default", settle_body.decode(SETTLE % rid.encode()))
        native._encode(result)

    async def both(n: int) -> list[str]:
        rids: list[str] = []
        for _ in range(n // 50):
            rids += await asyncio.gather(*(authorize() for _ in range(50)))
        return rids

    for r in await both(600):  # warm-up, uninstrumented
        await settle(r)
    _control("--instr=on")
    for r in await both(200):
        await settle(r)
    _control("-z")
    rids = await both(requests)
    _control("--dump")
    per_authorize = _dumped(prefix) / len(rids)
    _control("-z")
    for i in range(0, len(rids), 50):
        await asyncio.gather(*(settle(r) for r in rids[i : i + 50]))
    _control("--dump")
    per_settle = _dumped(prefix) / len(rids)
    await engine.close()
    await store.close()
    return per_authorize, per_settle


def _child(url: str, requests: int, prefix: str) -> None:
    import uvloop

    sys.path.insert(0, os.getcwd())
    a, s = uvloop.run(_count(url, requests, prefix))
    print(f"{a:.0f} {s:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[Path.cwd()])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return
    server = RedisServer().start()
    try:
        for tree in args.trees:
            workdir = tempfile.mkdtemp(prefix="bs-engine-cg-")
            prefix = f"{workdir}/cg."
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                 f"--callgrind-out-file={prefix}%p", sys.executable, __file__,
                 "--child", server.url, str(args.requests), prefix],
                cwd=tree.resolve(), capture_output=True, text=True, check=True,
                # This script, with the tree's sidecar (and its bench and tests) imported.
                env={**os.environ, "PYTHONPATH": str(tree.resolve())},
            ).stdout.split()  # fmt: skip
            for leftover in glob.glob(prefix + "*"):
                os.unlink(leftover)
            os.rmdir(workdir)
            a, s = float(out[-2]), float(out[-1])
            print(f"{tree}: authorize {a:,.0f} settle {s:,.0f}", flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
