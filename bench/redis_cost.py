"""Redis CPU per operation (issue 20): how much of one primary's single thread each
authorize, settle, authorize+settle pair and check takes, next to the floor (an EVALSHA
doing 3 HINCRBY on one hash, pipelined), measured in the same run on the same server.

All of one tenant's counters share one hash tag, so one primary's main thread is the
ceiling for a tenant however many sidecars and Cluster nodes it has: 1e6 / (pair µs) is
how many governed LLM calls a second one primary can serve.

Per operation three figures, from deltas of INFO around a wrk run:
- CPU: the main thread's user+sys CPU (INFO cpu), which includes reading requests and
  writing replies, divided by the operations wrk counted. This is the figure: the ratios to
  the floor and the calls/s use it;
- in scripts: the EVALSHA/EVAL time of INFO commandstats;
- in commands: the time of every other data command (those called inside the scripts, and
  any sent beside them); scripts minus commands is the Lua interpreter's own work.
commandstats times are wall clock (Redis times each call with its clock), so on a loaded
machine a descheduled call inflates them, and they can exceed the CPU figure: read them as
the split of a script's time, not as CPU.

`redis_cost(server, config, seconds)` measures one sidecar config; `GUARDS_CONFIG` is the
hook for "the same with one guard of each kind" (see its comment). Nothing here asserts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import WrkResult, sidecar_cmd, start, stop, warm_up, wrk
from tests.harness import free_port

BENCH = Path(__file__).resolve().parent

# The floor: one script call doing the least a budget decision can do, 3 HINCRBY on one
# hash (one per stacked budget), pipelined as the sidecar pipelines its connection.
FLOOR_LUA = (
    "redis.call('HINCRBY', KEYS[1], 'a', 1) "
    "redis.call('HINCRBY', KEYS[1], 'b', 1) "
    "redis.call('HINCRBY', KEYS[1], 'c', 1) "
    "return 1"
)
FLOOR_CALLS = 200_000

# What bench.run adds to its CONFIG for the same figures with the guards on (None: not
# measured). One guard of each kind on the bench's identity (issue 18), none of which
# denies: a per-run cap with a call cap, a usd velocity limit, a loop guard (every request
# of wrk_authorize_guarded.lua has its own fingerprint), and the stop switch (read on
# every decision whether or not a stop exists).
GUARDS_CONFIG: str | None = """
  - {id: per-run, name: Each run, scope: run, period: total, limit_usd: 1000000000,
     limit_calls: 1000000000}
rate_limits:
  - {id: burn, scope: user, metric: usd, limit: 3000, window: 1d}
loop_guards:
  - {id: same-prompt, scope: user, repeats: 3, window: 1m}
"""
GUARDED_AUTHORIZE = "wrk_authorize_guarded.lua"

# Commands that are the bench's own probing or the connection's set-up, not decision work.
_NOT_DECISION_WORK = {"info", "ping", "script", "config", "client", "hello", "select", "command"}
_SCRIPT_COMMANDS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}


@dataclass
class Snapshot:
    cpu_us: float
    usec: dict[str, float]  # per command, from INFO commandstats
    calls: dict[str, int]


def main_thread_cpu_us(client: Any) -> float:
    """user+sys CPU of redis-server's main thread (the whole process on a Redis that does
    not report its main thread apart), in µs."""
    info = client.info("cpu")
    if "used_cpu_sys_main_thread" in info:
        return (
            float(info["used_cpu_sys_main_thread"]) + float(info["used_cpu_user_main_thread"])
        ) * 1e6
    return (float(info["used_cpu_sys"]) + float(info["used_cpu_user"])) * 1e6


def snapshot(client: Any) -> Snapshot:
    stats = client.info("commandstats")
    usec, calls = {}, {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        usec[name] = float(value["usec"])
        calls[name] = int(value["calls"])
    return Snapshot(main_thread_cpu_us(client), usec, calls)


@dataclass
class Spent:
    """What Redis spent between two snapshots."""

    cpu_us: float
    script_us: float
    command_us: float
    script_calls: int
    commands: dict[str, int] = field(default_factory=dict)


def spent(before: Snapshot, after: Snapshot) -> Spent:
    script_us = command_us = 0.0
    script_calls = 0
    commands: dict[str, int] = {}
    for name, usec in after.usec.items():
        if name in _NOT_DECISION_WORK:
            continue
        d_usec = usec - before.usec.get(name, 0.0)
        d_calls = after.calls[name] - before.calls.get(name, 0)
        if d_calls == 0:
            continue
        if name in _SCRIPT_COMMANDS:
            script_us += d_usec
            script_calls += d_calls
        else:
            command_us += d_usec
            commands[name] = d_calls
    return Spent(after.cpu_us - before.cpu_us, script_us, command_us, script_calls, commands)


def during(client: Any, run: Callable[[], Any]) -> tuple[Any, Spent]:
    """`run()`'s result and what Redis spent while it ran."""
    before = snapshot(client)
    result = run()
    return result, spent(before, snapshot(client))


@dataclass
class PerOp:
    cpu_us: float
    script_us: float
    command_us: float

    @staticmethod
    def of(s: Spent, ops: float) -> PerOp:
        return PerOp(s.cpu_us / ops, s.script_us / ops, s.command_us / ops)

    def minus(self, other: PerOp, times: float = 1.0) -> PerOp:
        return PerOp(
            self.cpu_us - times * other.cpu_us,
            self.script_us - times * other.script_us,
            self.command_us - times * other.command_us,
        )

    def plus(self, other: PerOp) -> PerOp:
        return PerOp(
            self.cpu_us + other.cpu_us,
            self.script_us + other.script_us,
            self.command_us + other.command_us,
        )


def floor(server: Any) -> PerOp:
    """Redis per call of the floor script: redis-benchmark, 50 clients, pipelined 16 deep,
    on a hash of its own."""
    client = server.client()
    sha = client.script_load(FLOOR_LUA)
    cmd = [
        "redis-benchmark", "-p", str(server.port), "-c", "50", "-P", "16", "-q",
        "-n", str(FLOOR_CALLS), "evalsha", sha, "1", "{bench-floor}:counters",
    ]  # fmt: skip
    _, s = during(client, lambda: subprocess.run(cmd, capture_output=True, check=True, timeout=300))
    if s.script_calls < FLOOR_CALLS:
        sys.exit(f"floor script ran {s.script_calls} times, not {FLOOR_CALLS}")
    client.delete("{bench-floor}:counters")
    return PerOp.of(s, s.script_calls)


@dataclass
class RedisCost:
    """Redis per operation of one sidecar config, and the wrk runs that measured it."""

    authorize: PerOp
    settle: PerOp
    pair: PerOp
    check: PerOp
    authorize_commands: float  # Redis commands per authorize, the script and those inside it
    runs: dict[str, WrkResult]  # authorize_64, pair_64, check_64

    def figures(self, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for op in ("authorize", "settle", "pair", "check"):
            per: PerOp = getattr(self, op)
            out[f"{prefix}redis_cpu_us_per_{op}"] = per.cpu_us
            out[f"{prefix}redis_script_us_per_{op}"] = per.script_us
            out[f"{prefix}redis_command_us_per_{op}"] = per.command_us
        out[f"{prefix}primary_calls_per_s"] = 1e6 / self.pair.cpu_us
        return out


_PAIR = re.compile(r"PAIR decisions=(\d+) settles=(\d+) denials=(\d+)")


def measure_running(
    client: Any,
    base: str,
    seconds: int,
    authorize_script: str = "wrk_authorize.lua",
    watch: dict[str, int] | None = None,
) -> RedisCost:
    """Authorize, authorize+settle pairs and check against a running sidecar at `base`, 64
    connections each, with Redis deltas around each run; `watch`: the processes whose CPU
    per authorize the authorize run reports (bench.load.wrk).

    Settle is what the pair run spent beyond its authorizes: (pair CPU - decisions x
    authorize) / settles; a pair is authorize + settle.
    """
    a64, s_auth = during(
        client, lambda: wrk(base + "/v1/authorize", BENCH / authorize_script, 64, seconds, watch)
    )
    pair, s_pair = during(client, lambda: wrk(base + "/", BENCH / "wrk_pair.lua", 64, seconds))
    check, s_check = during(
        client, lambda: wrk(base + "/v1/check", BENCH / "wrk_check.lua", 64, seconds)
    )
    for name, result in (("authorize", a64), ("pair", pair), ("check", check)):
        if "non-2xx" in result.extra:
            sys.exit(f"sidecar {name} answered errors ({result.extra.strip()}): no per-op figure")
    counted = _PAIR.search(pair.extra)
    if counted is None:
        sys.exit(f"wrk_pair.lua printed no counts: {pair.extra!r}")
    decisions, settles = int(counted.group(1)), int(counted.group(2))
    if settles == 0:
        sys.exit("the pair run settled nothing")
    authorize = PerOp.of(s_auth, a64.requests)
    settle = PerOp.of(s_pair, 1).minus(authorize, decisions)
    settle = PerOp(settle.cpu_us / settles, settle.script_us / settles, settle.command_us / settles)
    return RedisCost(
        authorize_commands=(s_auth.script_calls + sum(s_auth.commands.values())) / a64.requests,
        authorize=authorize,
        settle=settle,
        pair=authorize.plus(settle),
        check=PerOp.of(s_check, check.requests),
        runs={"authorize_64": a64, "pair_64": pair, "check_64": check},
    )


def redis_cost(
    server: Any, config: Path, seconds: int, authorize_script: str = "wrk_authorize.lua"
) -> RedisCost:
    """Redis per operation of a sidecar started on `config` (one process, 64 connections):
    the hook the guard figure uses; bench.run measures its main config with
    measure_running on the sidecar it already runs."""
    port = free_port()
    proc = start(sidecar_cmd(port, server.url, config), f"http://127.0.0.1:{port}/healthz")
    try:
        base = f"http://127.0.0.1:{port}"
        warm_up(base)
        return measure_running(server.client(), base, seconds, authorize_script)
    finally:
        stop(proc)


def guarded_redis_cost(
    server: Any, workdir: Path, base_config: str, seconds: int
) -> RedisCost | None:
    """The same figures with one guard of each kind (issue 18), or None while
    GUARDS_CONFIG is unset."""
    if GUARDS_CONFIG is None:
        return None
    path = workdir / "bench-guarded.yaml"
    path.write_text(guarded_config(base_config))
    return redis_cost(server, path, seconds, GUARDED_AUTHORIZE)


def guarded_config(base_config: str) -> str:
    """`base_config` (budgets first, then the rest) with GUARDS_CONFIG's budget added to its
    budgets and its other sections appended."""
    assert GUARDS_CONFIG is not None
    budget, _, rest = GUARDS_CONFIG.partition("rate_limits:")
    head, _, tail = base_config.partition("pricing:")
    return head + budget.lstrip("\n") + "pricing:" + tail + "rate_limits:" + rest


def report(cost: RedisCost, floor_op: PerOp, guarded: RedisCost | None) -> None:
    def line(label: str, per: PerOp) -> None:
        print(
            f"  {label:<34} {per.cpu_us:>6.1f} µs CPU  {per.cpu_us / floor_op.cpu_us:>5.1f}x floor"
            f"  {1e6 / per.cpu_us:>9,.0f}/s  (wall in scripts {per.script_us:.1f} µs,"
            f" in commands {per.command_us:.1f} µs)"
        )

    print("Redis per operation (main thread CPU from INFO cpu; wall times from commandstats):")
    line("floor: EVALSHA 3xHINCRBY, -P 16", floor_op)
    line("sidecar authorize (3 budgets)", cost.authorize)
    line("sidecar settle", cost.settle)
    line("authorize + settle pair", cost.pair)
    line("sidecar check (3 budgets)", cost.check)
    print(
        f"  {'calls/s one primary can serve':<34} {1e6 / cost.pair.cpu_us:>9,.0f}"
        f"  (1e6 / pair µs; pair / floor {cost.pair.cpu_us / floor_op.cpu_us:.1f}x, goal ≤ 6x)"
    )
    if guarded is None:
        print(f"  {'with one guard of each kind':<34} not measured: no guard config yet (issue 18)")
    else:
        line("authorize, one guard of each kind", guarded.authorize)
        line("pair, one guard of each kind", guarded.pair)
        plain_rps = cost.runs["authorize_64"].requests_per_s
        guarded_rps = guarded.runs["authorize_64"].requests_per_s
        print(
            f"  {'runaway guards: decision cost':<34}"
            f" {plain_rps / guarded_rps:.2f}x throughput (plain {plain_rps:,.0f}/s, guarded"
            f" {guarded_rps:,.0f}/s), {guarded.authorize.cpu_us / cost.authorize.cpu_us:.2f}x"
            " Redis CPU per authorize (goal ≤ 1.2x)"
        )
        print(
            f"  {'  guarded pair / floor':<34}"
            f" {guarded.pair.cpu_us / floor_op.cpu_us:.1f}x (goal ≤ 8x),"
            f" guarded / plain pair {guarded.pair.cpu_us / cost.pair.cpu_us:.2f}x"
        )
