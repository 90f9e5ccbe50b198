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

Then the same pair's scripts with no Lua logic: each script as Redis ran it once (read
with MONITOR) is replaced by one that issues the same commands with the same arguments as
literals and returns 1, called with the same keys and arguments. That is what the pair's
Redis commands cost by themselves: the part of the figure no Lua change can remove.

`make bench ARGS=--instructions` runs it (needs valgrind). Nothing here asserts.
"""

from __future__ import annotations

import asyncio
import codecs
import glob
import os
import re
import socket
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
# Scripts as Redis ran them: (the EVALSHA or FCALL as sent, the commands it ran).
Captured = list[tuple[list[str], list[list[str]]]]


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


async def _drive(base: str, op: Op, count: int, connections: int = CONNECTIONS) -> None:
    left = list(range(count))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while left:
                await op(session, base, left.pop())

        await asyncio.gather(*(worker() for _ in range(connections)))


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


# One MONITOR line: "<time> [<db> <source>] "<arg>" "<arg>" ..." (source "lua" for the
# commands a script ran); arguments escaped as sdscatrepr escapes them.
_MONITOR_LINE = re.compile(r"^[0-9.]+ \[\d+ ([^\]]+)\] (.*)$")
_MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _unrepr(arg: str) -> str:
    return codecs.decode(arg.encode("latin-1"), "unicode_escape")


def _capture(server: _Redis, base: str, op: Op) -> Captured:
    """The scripts one `op` makes Redis run, as (the EVALSHA or FCALL as sent, the commands it ran),
    read with MONITOR on a connection of its own."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"MONITOR\r\n")
        assert sock.recv(5) == b"+OK\r\n"
        asyncio.run(_drive(base, op, 1, connections=1))
        server.client.ping()  # a marker: everything before it has been fed to MONITOR
        data = b""
        while b'"ping"' not in data and b'"PING"' not in data:
            data += sock.recv(1 << 16)
    finally:
        sock.close()
    scripts: Captured = []
    for line in data.decode("latin-1").split("\r\n"):
        m = _MONITOR_LINE.match(line.lstrip("+"))
        if m is None:
            continue
        args = [_unrepr(a) for a in _MONITOR_ARG.findall(m.group(2))]
        if m.group(1) == "lua":
            if scripts:
                scripts[-1][1].append(args)
        elif args and args[0].lower() in ("evalsha", "fcall"):
            scripts.append((args, []))
    return scripts


def _lua_literal(text: str) -> str:
    return (
        '"'
        + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\{ord(c):03d}" for c in text)
        + '"'
    )


def _commands_only(server: _Redis, scripts: Captured, count: int) -> float:
    """Instructions per run of the captured scripts' Redis commands with no Lua logic: each
    script replaced by one that issues its commands, with their arguments as literals, and
    returns 1; called with the same keys and arguments (their parsing is counted)."""
    replays = []
    for call, commands in scripts:
        body = "\n".join(
            "redis.call(" + ", ".join(_lua_literal(a) for a in command) + ")"
            for command in commands
        )
        replays.append((server.client.script_load(body + "\nreturn 1"), call[2:]))
    pipe = server.client.pipeline(transaction=False)
    server.counted()
    for i in range(count):
        for sha, (numkeys, *rest) in replays:
            pipe.evalsha(sha, int(numkeys), *rest)
        if i % 16 == 15:
            pipe.execute()
    pipe.execute()
    return server.counted() / count


@dataclass
class Counts:
    floor: float
    per_op: dict[str, float]  # authorize, pair, check, guarded_authorize, guarded_pair
    # The same scripts' Redis commands with no Lua logic (_commands_only): authorize,
    # settle, pair, guarded_pair.
    commands_only: dict[str, float]
    commands: dict[str, int]  # how many commands those scripts ran

    def figures(self) -> dict[str, float]:
        out = {"redis_instructions_floor": self.floor}
        for name, value in self.per_op.items():
            out[f"redis_instructions_{name}"] = value
        for name, value in self.commands_only.items():
            out[f"redis_instructions_commands_only_{name}"] = value
        out["redis_instructions_settle"] = self.per_op["pair"] - self.per_op["authorize"]
        return out


def _sidecar(server: _Redis, workdir: Path, name: str, config: str) -> tuple[Any, str]:
    path = workdir / f"{name}.yaml"
    # A redis-server under callgrind runs some 50x slower, and on a machine loaded by
    # others a reply then takes over bench.run's 1 s now and then: the fail mode, and a
    # count cut short. The timeout changes nothing Redis executes.
    path.write_text(config.replace("redis_timeout_ms: 1000", "redis_timeout_ms: 20000"))
    port = free_port()
    proc = start(sidecar_cmd(port, server.url, path), f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}"


def measure(config: str, count: int = 500) -> Counts:
    """Instructions per operation of a sidecar on `config` and of the same with one guard
    of each kind, and the floor's, all counted in one redis-server."""
    server = _Redis()
    per_op: dict[str, float] = {}
    commands_only: dict[str, float] = {}
    commands: dict[str, int] = {}
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
                    # An authorize's script and its settle's, as the pair ran them.
                    scripts = _capture(server, base, pair if name == "plain" else guarded_pair)
                finally:
                    stop(proc)
                commands[name] = sum(len(ran) for _, ran in scripts)
                if name == "plain":
                    commands["authorize"] = len(scripts[0][1])
                    commands_only["authorize"] = _commands_only(server, scripts[:1], count)
                    commands_only["settle"] = _commands_only(server, scripts[1:], count)
                    commands_only["pair"] = _commands_only(server, scripts, count)
                else:
                    commands_only["guarded_pair"] = _commands_only(server, scripts, count)
    finally:
        server.close()
    return Counts(floor, per_op, commands_only, commands)


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
    print("  the same scripts' Redis commands alone (no Lua logic, one-element reply):")
    n = c.commands
    line(f"  authorize's {n['authorize']} commands", c.commands_only["authorize"])
    line(f"  settle's {n['plain'] - n['authorize']} commands", c.commands_only["settle"])
    line(f"  the pair's {n['plain']} commands", c.commands_only["pair"])
    line(f"  the guarded pair's {n['guarded']}", c.commands_only["guarded_pair"])


if __name__ == "__main__":
    from bench.run import CONFIG

    report(measure(CONFIG))
