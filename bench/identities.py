"""`python -m bench.identities`: a sidecar's own memory as distinct identities go through it.

A real `python -m sidecar serve` (tests/harness.py SidecarProcess) over a real redis-server;
N distinct identities (user_id, agent_id, run_id, fingerprint and model each new per
identity), each making one authorize and settle and one authorize the run's call cap
denies, a few at once. The process's resident memory (VmRSS, /proc) is read after a
warm-up and after the last identity: what stays per identity is what the in-process
caches kept (each is capped: sidecar/resolution.py's memo, sidecar/rendering.py's parsed
counters, sidecar/guards.py's log throttle, the metrics' label children, the key caches in
sidecar/keys.py), so the growth flattens once they are full. Also printed: the /metrics
series count before and after (no identity is a label).

Not part of `make bench`: 50,000 identities take a few minutes on two shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

# What each identity meets: a budget per user, per agent and per run (with a call cap),
# a request limit per user, a spend velocity per agent, a loop guard per run.
DOC: dict[str, Any] = {
    "budgets": [
        {"id": "per-user", "name": "Each user", "scope": "user", "limit_usd": 100,
         "period": "daily"},
        {"id": "per-agent", "name": "Each agent", "scope": "agent", "limit_usd": 100,
         "period": "daily"},
        {"id": "per-run", "name": "Each run", "scope": "run", "period": "total",
         "limit_usd": 5, "limit_calls": 1},
    ],
    "rate_limits": [
        {"id": "rpm", "scope": "user", "metric": "requests", "limit": 100, "window": "1m"},
        {"id": "burn", "scope": "agent", "metric": "usd", "limit": 5, "window": "10s"},
    ],
    "loop_guards": [{"id": "same", "scope": "run", "repeats": 3, "window": "10m"}],
    "settings": {"redis_timeout_ms": 10_000},
}  # fmt: skip
CONCURRENCY = 16


def body(i: int) -> dict[str, Any]:
    return {"user_id": f"user-{i}", "agent_id": f"agent-{i}", "run_id": f"run-{i}",
            "fingerprint": f"{i:064x}", "provider": "openai", "model": f"model-{i}",
            "estimated_usd": 0.001}  # fmt: skip


async def one(session: aiohttp.ClientSession, url: str, i: int) -> None:
    """One identity's calls; every answer must be the decision expected (never a 500)."""
    async with session.post(f"{url}/v1/authorize", json=body(i)) as r:
        held = await r.json()
        assert r.status == 200 and held["allowed"], (r.status, held)
    settle = {"reservation_id": held["reservation_id"], "tokens_in": 10, "tokens_out": 5}
    async with session.post(f"{url}/v1/settle", json=settle) as r:
        assert r.status == 200, await r.text()
    async with session.post(f"{url}/v1/authorize", json=body(i)) as r:
        denied = await r.json()  # the run's call cap (1) is spent: a guard's denial
        assert r.status == 429 or not denied["allowed"], (r.status, denied)
        assert denied["reason"] == "calls", denied


async def drive(url: str, start: int, stop: int) -> None:
    queue = iter(range(start, stop))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for i in queue:
                await one(session, url, i)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def series(url: str) -> int:
    """How many samples /metrics exposes (one line each)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    from tests.harness import RedisServer, SidecarProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "identities.json"
        config.write_text(json.dumps(DOC))
        server = RedisServer().start()
        sidecar = SidecarProcess(server.url, str(config))
        try:
            sidecar.start()
            assert sidecar.process is not None
            pid = sidecar.process.pid
            asyncio.run(drive(sidecar.url, 0, args.warmup))
            before, series_before = rss_bytes(pid), asyncio.run(series(sidecar.url))
            asyncio.run(drive(sidecar.url, args.warmup, args.warmup + args.identities))
            after, series_after = rss_bytes(pid), asyncio.run(series(sidecar.url))
        finally:
            sidecar.cleanup()
            server.cleanup()
    grown = after - before
    print(json.dumps({
        "identities": args.identities,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_growth_mib": round(grown / 2**20, 1),
        "bytes_per_identity": round(grown / args.identities, 1),
        "metrics_series_before": series_before,
        "metrics_series_after": series_after,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
