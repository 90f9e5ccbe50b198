"""Instructions redis-server executes per sidecar operation (callgrind), next to the floor
script's: the Redis figures of issue 20 as counts that do not move with the machine's load.

`bench.redis_cost` measures Redis CPU in µs, which on the shared 2-core machine moves with
whatever else runs (a loaded Redis also serves fewer replies per read, and its caches are
colder). Here redis-server runs under valgrind's callgrind, the sidecar (not under valgrind)
sends it the operations, and what is counted is the instructions Redis executed for them:
the same figure on any run. The floor is counted the same way: FLOOR_LUA (3 HINCRBY on one
hash) pipelined 16 deep, as redis-benchmark sends it in `bench.redis_cost.floor`.

Per operation: `count` operations over 16 connections after a warm-up; Redis's own idle
work in that time (the sidecar's sweeps and polls) is measured right after, for as long, and
subtracted. The pair is an authorize and the settle of its reservation (tokens given); the
guarded authorize and pair add one guard of each kind (bench.redis_cost.GUARDS_CONFIG),
their calls spread over 20 runs and each with a fingerprint of its own.

`make bench ARGS=--instructions` runs it (needs valgrind). Nothing here asserts.
"""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench import redis_cost
from bench.load import sidecar_cmd, start, stop
from tests.harness import free_port, redis_binary

BODY: dict[str, Any] = {
    "org_id": "org-1", "team_id": "team-1", "user_id": "user-1", "provider": "openai",
    "model": "gpt-4o", "estimated_tokens_in": 500, "estimated_tokens_out": 200,
    "lease_ms": 600000,
}  # fmt: skip
CONNECTIONS = 16
RUNS = 20  # the guarded calls' run ids: a run makes many calls

Op = Callable[[aiohttp.ClientSession, str, int], Awaitable[None]]


class _Redis:
    """redis-server under callgrind, and its instruction counter."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bs-redis-cg-")
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir}/cg.%p",
             redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(port=self.port, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def counted(self) -> int:
        """Instructions since the last call (the counters are zeroed after each dump)."""
        for f in glob.glob(f"{self.dir}/cg.*"):
            os.unlink(f)
        subprocess.run(
            ["callgrind_control", "-d", str(self.proc.pid)], capture_output=True, check=True
        )
        total = 0
        for f in glob.glob(f"{self.dir}/cg.*"):
            for line in Path(f).read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        subprocess.run(
            ["callgrind_control", "-z", str(self.proc.pid)], capture_output=True, check=True
        )
        return total

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def _drive(base: str, op: Op, count: int) -> None:
    left = list(range(count))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while left:
                await op(session, base, left.pop())

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


async def _authorize(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    async with session.post(base + "/v1/authorize", json=body) as r:
        d = await r.json()
        if r.status != 200 or not d.get("allowed"):
            raise RuntimeError(f"authorize answered {r.status} {d}")
        return str(d["reservation_id"])


async def authorize(session: aiohttp.ClientSession, base: str, i: int) -> None:
    await _authorize(session, base, BODY)


async def guarded(session: aiohttp.ClientSession, base: str, i: int) -> None:
    body = {**BODY, "run_id": f"run-{i % RUNS}", "fingerprint": f"q-{i}-{time.monotonic_ns()}"}
    await _authorize(session, base, body)


async def pair(session: aiohttp.ClientSession, base: str, i: int) -> None:
    await _settle(session, base, await _authorize(session, base, BODY))


async def guarded_pair(session: aiohttp.ClientSession, base: str, i: int) -> None:
    body = {**BODY, "run_id": f"run-{i % RUNS}", "fingerprint": f"q-{i}-{time.monotonic_ns()}"}
    await _settle(session, base, await _authorize(session, base, body))


async def _settle(session: aiohttp.ClientSession, base: str, rid: str) -> None:
    settle = {"reservation_id": rid, "tokens_in": 450, "tokens_out": 180}
    async with session.post(base + "/v1/settle", json=settle) as r:
        if r.status != 200:
            raise RuntimeError(f"settle answered {r.status} {await r.text()}")


async def check(session: aiohttp.ClientSession, base: str, i: int) -> None:
    body = {k: v for k, v in BODY.items() if k != "lease_ms"}
    async with session.post(base + "/v1/check", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"check answered {r.status} {await r.text()}")


def _per_op(server: _Redis, base: str, op: Op, count: int) -> float:
    asyncio.run(_drive(base, op, 50))  # warm-up: memo, connections, scripts loaded
    server.counted()
    t0 = time.monotonic()
    asyncio.run(_drive(base, op, count))
    busy, elapsed = server.counted(), time.monotonic() - t0
    time.sleep(elapsed)
    idle = server.counted()
    return (busy - idle) / count


def _floor(server: _Redis, count: int) -> float:
    sha = server.client.script_load(redis_cost.FLOOR_LUA)
    pipe = server.client.pipeline(transaction=False)
    server.counted()
    for i in range(count):
        pipe.evalsha(sha, 1, "{bench-floor}:counters")
        if i % 16 == 15:
            pipe.execute()
    pipe.execute()
    return server.counted() / count


@dataclass
class Counts:
    floor: float
    per_op: dict[str, float]  # authorize, pair, check, guarded_authorize, guarded_pair

    def figures(self) -> dict[str, float]:
        out = {"redis_instructions_floor": self.floor}
        for name, value in self.per_op.items():
            out[f"redis_instructions_{name}"] = value
        out["redis_instructions_settle"] = self.per_op["pair"] - self.per_op["authorize"]
        return out


def _sidecar(server: _Redis, workdir: Path, name: str, config: str) -> tuple[Any, str]:
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    port = free_port()
    proc = start(sidecar_cmd(port, server.url, path), f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}"


def measure(config: str, count: int = 500) -> Counts:
    """Instructions per operation of a sidecar on `config` and of the same with one guard
    of each kind, and the floor's, all counted in one redis-server."""
    server = _Redis()
    per_op: dict[str, float] = {}
    try:
        floor = _floor(server, count)
        with tempfile.TemporaryDirectory() as tmp:
            runs: list[tuple[str, str, list[tuple[str, Op]]]] = [
                ("plain", config, [("authorize", authorize), ("pair", pair), ("check", check)]),
                (
                    "guarded",
                    redis_cost.guarded_config(config),
                    [("guarded_authorize", guarded), ("guarded_pair", guarded_pair)],
                ),
            ]
            for name, text, ops in runs:
                proc, base = _sidecar(server, Path(tmp), name, text)
                try:
                    for op_name, op in ops:
                        per_op[op_name] = _per_op(server, base, op, count)
                finally:
                    stop(proc)
    finally:
        server.close()
    return Counts(floor, per_op)


def report(c: Counts) -> None:
    print("Redis instructions per operation (callgrind on redis-server; the sidecar's calls):")

    def line(label: str, value: float) -> None:
        print(f"  {label:<34} {value / 1000:8.1f}k  {value / c.floor:5.1f}x floor")

    line("floor: EVALSHA 3xHINCRBY, -P 16", c.floor)
    line("sidecar authorize (3 budgets)", c.per_op["authorize"])
    line("sidecar settle", c.per_op["pair"] - c.per_op["authorize"])
    line("authorize + settle pair", c.per_op["pair"])
    line("sidecar check (3 budgets)", c.per_op["check"])
    line("authorize, one guard of each kind", c.per_op["guarded_authorize"])
    line("pair, one guard of each kind", c.per_op["guarded_pair"])
    print(
        f"  {'runaway guards: authorize':<34} "
        f"{c.per_op['guarded_authorize'] / c.per_op['authorize']:.2f}x the plain one's instructions"
    )


if __name__ == "__main__":
    from bench.run import CONFIG

    report(measure(CONFIG))
