"""`make bench`: the sidecar's throughput and latency next to the raw ceilings of its
building blocks, measured in the same run on the same machine, printed as ratios.

- bare: aiohttp + uvloop + msgspec POST with no Redis (the HTTP ceiling)
- bare + EVALSHA: the same, plus one EVALSHA of a script that returns at once over the
  sidecar's pipelined connection (the round trip through Redis, before any budget logic)
- raw EVALSHA: redis-benchmark running the same authorize script, 50 clients, pipelined
  16 deep (the Redis ceiling), and PING at one client (the Redis round trip)
- sidecar: POST /v1/authorize (3 stacked budgets) at 64 connections and at 1 connection,
  authorize followed by settle, check, and authorize under 5 stacked budgets
- Redis per operation (bench.redis_cost): main-thread CPU µs per authorize, settle, pair
  and check next to the floor (EVALSHA of 3 HINCRBY on one hash, pipelined), as ratios to
  it, and the calls/s one primary can serve; the same with one guard of each kind
  (redis_cost.GUARDS_CONFIG, issue 18)
- the same authorize with `--workers 2` (SO_REUSEPORT), as a ratio to one worker
- the same authorize with `settings.fast_http: false` (aiohttp serving the hot routes too),
  as a ratio to the fast path; settles/s derived from the pair run
- with --instructions: CPU instructions per request of the bare endpoint and of authorize,
  counted by valgrind (bench.instructions), a ratio that does not move with the load; and
  the instructions redis-server executes per authorize, settle, pair, check and guarded
  authorize next to the floor script's (bench.redis_instructions), likewise

wrk (a separate C process) is the load generator. Figures are noisy on a shared machine:
read the ratios. Nothing here asserts; tests never time anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench import instructions, proxy, redis_cost, redis_instructions
from bench.load import WrkResult, sidecar_cmd, start, stop, warm_up, wrk
from sidecar import keys, learned
from sidecar.config import parse as config_parse
from sidecar.engine import _ledger_config
from sidecar.scripts import Scripts
from tests.harness import RedisServer, free_port, wait_until

BENCH = Path(__file__).resolve().parent
CONFIG = """
budgets:
  - {id: org, name: Org, scope: organization, limit_usd: 1000000000, period: monthly}
  - {id: team, name: Team, scope: team, limit_usd: 1000000000, period: daily}
  - {id: user, name: Each user, scope: user, limit_usd: 1000000000, period: daily}
  # Only wrk_authorize5.lua names an agent and a workflow: five stacked budgets.
  - {id: agent, name: Each agent, scope: agent, limit_usd: 1000000000, period: daily}
  - {id: wf, name: Each workflow, scope: workflow, limit_usd: 1000000000, period: weekly}
pricing:
  - {provider: openai, model: gpt-4o, input_per_1k: 0.0025, output_per_1k: 0.01}
settings:
  redis_timeout_ms: 1000
"""
# The same, plus two rate limits on the same identity that never deny: what checking
# (and charging) limiters adds to a decision.
RATE_LIMITS = """
rate_limits:
  - {id: rpm, scope: organization, metric: requests, limit: 1000000, window: 1s}
  - {id: tpm, scope: team, metric: tokens, limit: 100000000, window: 1s}
"""
RAW_RATE_ARGS = ["rpm/org-1", "r", "1000000", "1000", "0", "0",
                 "tpm/team-1", "t", "100000000", "1000", "0", "0"]  # fmt: skip


BENCH_CIDS = ("org/org-1/m20260101", "team/team-1/d20260101", "user/user-1/d20260101")


def budget_argv(cids: tuple[str, ...], rate_args: list[str]) -> list[str]:
    """authorize.lua's arguments from ARGV[26] on (its header) for block budgets of $1e9
    on `cids` with the default alert thresholds, and the rate limits `rate_args` (six
    each), as sidecar.resolution builds them: no call cap, no stop field, no loop guard."""
    limit = "1000000000000000"
    rates = [rate_args[i : i + 6] for i in range(0, len(rate_args), 6)]

    def joined(metric: str) -> str:
        return ",".join(f"{r[0]}:{r[2]}:{r[3]}" for r in rates if r[1] == metric)

    parts = [
        ",".join(cids),
        ";".join(f"{limit}:50.80.100:b" for _ in cids),
        "",
        ",".join(r[0] for r in rates if r[1] == "c"),
        joined("t"),
        joined("u"),
    ]
    per_budget = [v for _ in cids for v in (limit, "b", "", "")]
    fields = [f for cid in cids for f in (f"u:{cid}", f"h:{cid}")]
    fields += [
        f
        for r in rates
        for f in ((f"n:{r[0]}",) * 2 if r[1] == "c" else (f"d:{r[0]}", f"l:{r[0]}"))
    ]
    fields += [f"w:{cid}" for cid in cids]
    return [*parts, *per_budget, *rate_args, *fields]


def raw_evalsha(server: RedisServer, seconds: int, rate_args: list[str] | None = None) -> float:
    """redis-benchmark of the authorize script itself, with the bench's 3 budgets (and
    rate limiters, if given)."""
    script = Scripts.load_all().authorize
    client = server.client()
    client.script_load(script.source)
    tk = keys.tenant_keys("bench-raw")
    now = str(int(time.time() * 1000))
    cmd = [
        "redis-benchmark", "-p", str(server.port), "-c", "50", "-P", "16", "-q",
        "-n", str(40_000 * seconds), "-r", "1000000000",
        "evalsha", script.sha, "4", *tk.hot,
        now, "rid-__rand_int__", "600000", "5000", "", "2500000", "10000000", "86400000",
        "meta", "700", "3", "",
        # no idempotency fingerprint, no downgrade, returned (not charged) at the lease end
        "", "", "", "", "", "", "",
        "", "", "",  # a fixed estimate: no learned-estimate series (ARGV[20..22])
        # the rate limits, no stop fields, no loop guards (ARGV[23..25])
        str(len(rate_args or []) // 6), "0", "0",
        *budget_argv(BENCH_CIDS, rate_args or []),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    rps = re.findall(r"([\d.]+) requests per second", out)
    return float(rps[-1])


def settle_learned_ratio(server: RedisServer, n: int = 20_000) -> dict[str, float]:
    """Redis time per settle.lua call (INFO commandstats, usec_per_call of EVALSHA) with
    learned estimates off and on (issue 19; goal: on / off <= 1.1). `n` reservations of one
    agent on the bench's 3 budgets are made by authorize.lua, then settled at a given cost,
    pipelined; on, each settle teaches the series its cost (a full ring of 32 after the
    first 32) as the sidecar's settle does, with the default ledger."""
    scripts = Scripts.load_all()
    client = server.client()
    tk = keys.tenant_keys("bench-learned")
    cfg = config_parse({}, "<bench>")
    ledger, learn = _ledger_config(cfg), learned.settle_config(cfg.settings)
    series = keys.estimate_series("openai", "gpt-4o", "agent-1")
    figures: dict[str, float] = {}
    for mode, learning in (("off", learned.FIXED_ARGS), ("on", (series, 1_000_000, 10))):
        client.flushall()
        client.script_load(scripts.authorize.source)
        client.script_load(scripts.settle.source)
        now = int(time.time() * 1000)
        budgets = budget_argv(BENCH_CIDS, [])
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.evalsha(
                scripts.authorize.sha, 9, *tk.learning("20260101"),
                now, f"{i:032x}", 600_000, 10_000, "", 2_500_000, 10_000_000, 86_400_000,
                "openai\x1fgpt-4o\x1forg-1\x1fteam-1\x1fagent-1\x1f\x1fuser-1\x1f\x1f",
                30, 3, "", "", "", "", "", "", "", ledger, *learning, 0, 0, 0, *budgets,
            )  # fmt: skip
            if i % 1000 == 999:
                pipe.execute()
        client.config_resetstat()
        for i in range(n):
            pipe.evalsha(
                scripts.settle.sha, 9, *tk.learning("20260101"),
                now, f"{i:032x}", 86_400_000, "c", 10, 20, 15_000, "", ledger, "", "1", "",
                learn,
            )  # fmt: skip
            if i % 1000 == 999:
                pipe.execute()
        stats = client.info("commandstats")["cmdstat_evalsha"]
        assert int(stats["calls"]) == n, stats
        figures[f"settle_learned_{mode}_us"] = float(stats["usec_per_call"])
    if learned.parse_series(str(client.hget(tk.estimates, series))).count != n:
        sys.exit("bench: the learned settles did not teach their series")
    figures["settle_learned_ratio"] = (
        figures["settle_learned_on_us"] / figures["settle_learned_off_us"]
    )
    return figures


def ping_p50_ms(server: RedisServer) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(server.port), "-c", "1", "-n", "20000", "-t", "ping",
         "--csv", "--precision", "3"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    rows = [line.split(",") for line in out.strip().splitlines()[1:]]
    return min(float(r[4].strip('"')) for r in rows)


def wait_for_workers(url: str, count: int) -> None:
    """Until `count` distinct workers have answered (the last may still be starting)."""

    def all_up() -> bool:
        seen = set()
        for _ in range(16 * count):
            with urllib.request.urlopen(url, timeout=2) as r:
                seen.add(r.headers.get("X-Sidecar-Worker"))
        return len(seen) >= count

    wait_until(all_up, timeout_s=30, what=f"{count} workers")


@contextlib.contextmanager
def serving(server: RedisServer, config: Path, *, workers: int = 1) -> Iterator[tuple[str, int]]:
    """A sidecar on `config` (every worker answering), warmed up: its base URL and pid."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ("--workers", str(workers)) if workers > 1 else ()
    sidecar = start(sidecar_cmd(port, server.url, config, *extra), base + "/healthz")
    try:
        if workers > 1:
            wait_for_workers(base + "/healthz", workers)
        warm_up(base)
        yield base, sidecar.pid
    finally:
        stop(sidecar)


def authorize_64(server: RedisServer, config: Path, seconds: int, *, workers: int = 1) -> WrkResult:
    """POST /v1/authorize at 64 connections on a sidecar of its own."""
    with serving(server, config, workers=workers) as (base, _):
        return wrk(base + "/v1/authorize", BENCH / "wrk_authorize.lua", 64, seconds)


def measure_bare(
    server: RedisServer, seconds: int, *, through_redis: bool = False
) -> tuple[WrkResult, WrkResult, int]:
    """bench.bare at 64 connections and at 1; and the Redis commands the 64-connection
    run made. A request that failed (non-2xx) ends the bench: its figures would lie."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/authorize"
    cmd = [sys.executable, "-m", "bench.bare", "--port", str(port)]
    bare = start(cmd + (["--redis-url", server.url] if through_redis else []), url)
    try:
        wrk(url, BENCH / "wrk_authorize.lua", 64, 1)  # warm-up
        calls0 = int(server.client().info("stats")["total_commands_processed"])
        at64 = wrk(url, BENCH / "wrk_authorize.lua", 64, seconds, watch={"server": bare.pid})
        calls = int(server.client().info("stats")["total_commands_processed"]) - calls0
        at1 = wrk(url, BENCH / "wrk_authorize.lua", 1, seconds)
    finally:
        stop(bare)
    for result in (at64, at1):
        if "non-2xx" in result.extra:
            sys.exit(f"bench.bare answered errors ({result.extra.strip()})")
    return at64, at1, calls


def report(f: dict[str, float], seconds: int, pair_counts: str) -> None:
    def line(label: str, value: str) -> None:
        print(f"  {label:<46} {value}")

    def load(prefix: str) -> str:
        return (
            f"{f[prefix + '_per_s']:>9,.0f} /s  p50 {f.get(prefix + '_p50_ms', 0):.2f} ms"
            f"  p99 {f[prefix + '_p99_ms']:.2f} ms"
        )

    print(f"budget-sidecar bench ({seconds} s per run, wrk -t1, loopback)")
    line("raw EVALSHA authorize.lua (50 clients, -P 16)", f"{f['raw_evalsha_per_s']:>9,.0f} /s")
    line("bare aiohttp+msgspec POST, 64 connections", load("bare_64"))
    line("bare POST + 1 pipelined EVALSHA (return 1)", load("bare_redis_64"))
    line("  = redis commands per request", f"{f['bare_redis_commands_per_request']:.2f}")
    line("sidecar authorize, 64 connections", load("authorize_64"))
    line("  the same, settings.fast_http: false", load("aiohttp_path_64"))
    line("sidecar authorize+settle pairs, 64 connections", load("pair_64"))
    line("  = decisions/s", f"{f['pair_64_decisions_per_s']:>9,.0f} /s  [{pair_counts}]")
    line("  = settles/s (pair time less authorize's)", f"{f['settle_64_per_s']:>9,.0f} /s")
    line("sidecar check, 64 connections", load("check_64"))
    line("sidecar authorize, 5 stacked budgets, 64 conn.", load("five_64"))
    line("sidecar authorize, --workers 2, 64 connections", load("workers2_64"))
    line(
        "p50 at 1 connection",
        f"authorize {f['authorize_1_p50_ms']:.3f} ms, bare {f['bare_1_p50_ms']:.3f} ms, "
        f"redis PING {f['redis_ping_p50_ms']:.3f} ms, "
        f"bare + EVALSHA {f['bare_redis_1_p50_ms']:.3f} ms",
    )
    line("p99 at 1 connection", f"authorize {f['authorize_1_p99_ms']:.3f} ms")
    line(
        "redis per authorize",
        f"{f['redis_commands_per_decision']:.1f} commands (incl. inside the script), "
        f"{f['redis_cpu_us_per_decision']:.1f} us CPU",
    )
    line("/ext_authz (proxy route), 64 connections", load("proxy_64"))
    line("authorize + 2 rate limits, 64 connections", load("limited_64"))
    line(
        "raw EVALSHA with the 2 rate limits",
        f"{f['raw_evalsha_rate_limited_per_s']:>9,.0f} /s",
    )
    print("ratios:")
    line("authorize / bare POST throughput", f"{f['authorize_64_per_s'] / f['bare_64_per_s']:.2f}")
    line("settle / bare POST throughput", f"{f['settle_64_per_s'] / f['bare_64_per_s']:.2f}")
    line(
        "fast path / aiohttp path (fast_http: false)",
        f"{f['authorize_64_per_s'] / f['aiohttp_path_64_per_s']:.2f}",
    )
    line(
        "bare + EVALSHA / bare POST throughput",
        f"{f['bare_redis_64_per_s'] / f['bare_64_per_s']:.2f}",
    )
    line(
        "authorize / (bare + EVALSHA) throughput",
        f"{f['authorize_64_per_s'] / f['bare_redis_64_per_s']:.2f}",
    )
    line(
        "authorize / raw EVALSHA throughput",
        f"{f['authorize_64_per_s'] / f['raw_evalsha_per_s']:.2f}",
    )
    line(
        "proxy route / JSON authorize throughput",
        f"{f['proxy_64_per_s'] / f['authorize_64_per_s']:.2f}",
    )
    line(
        "cost of 2 rate limits (budget-only / limited)",
        f"HTTP {f['authorize_64_per_s'] / f['limited_64_per_s']:.2f}x, "
        f"raw EVALSHA {f['raw_evalsha_per_s'] / f['raw_evalsha_rate_limited_per_s']:.2f}x",
    )
    line(
        "workers 2 / workers 1 authorize throughput",
        f"{f['workers2_64_per_s'] / f['authorize_64_per_s']:.2f}",
    )
    line(
        "5 stacked budgets / 3, authorize throughput",
        f"{f['five_64_per_s'] / f['authorize_64_per_s']:.2f}",
    )
    line(
        "settle, learned estimates on / off (Redis us)",
        f"{f['settle_learned_ratio']:.2f}x  ({f['settle_learned_on_us']:.1f} / "
        f"{f['settle_learned_off_us']:.1f} us per call; goal <= 1.1)",
    )
    line(
        "authorize p50 @1 / (bare p50 + PING p50)",
        f"{f['authorize_1_p50_ms'] / (f['bare_1_p50_ms'] + f['redis_ping_p50_ms']):.2f}",
    )


def cpu_report(f: dict[str, float]) -> None:
    """Where each request's CPU went, per process (user + system, from /proc; wrk's from its
    rusage), and what authorize at bare's rate would need of this machine: the sidecar's
    one thread and the cores it shares with Redis and wrk."""
    cores = os.cpu_count() or 1
    print("CPU per request, 64 connections (µs, user + system):")

    def per_request(prefix: str, names: tuple[str, ...]) -> float:
        parts, total = [], 0.0
        for name in names:
            user, system = f[f"{prefix}_cpu_{name}_user_us"], f[f"{prefix}_cpu_{name}_sys_us"]
            parts.append(f"{name} {user:.1f} + {system:.1f}")
            total += user + system
        label = "bare aiohttp+msgspec POST" if prefix == "bare" else "sidecar authorize"
        print(f"  {label:<30} {'   '.join(parts)}   = {total:.1f}")
        return total

    per_request("bare", ("server", "wrk"))
    total = per_request("authorize", ("server", "redis", "wrk"))
    own = f["authorize_cpu_server_user_us"] + f["authorize_cpu_server_sys_us"]
    rate = f["bare_64_per_s"]
    print(
        f"  authorize at bare's rate ({rate:,.0f}/s) would need {own * rate / 1e6:.2f} of the "
        f"sidecar's one thread and {total * rate / 1e6:.2f} of the machine's {cores} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count CPU instructions per request under valgrind (about a minute)",
    )
    args = parser.parse_args()
    tools = ("wrk", "redis-benchmark") + (("valgrind",) if args.instructions else ())
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"bench needs {tool} (apt-get install wrk redis-tools valgrind)")

    s = args.seconds
    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="bs-bench-"))
    config = workdir / "bench.yaml"
    config.write_text(CONFIG)
    figures: dict[str, float] = {}
    try:
        figures["raw_evalsha_per_s"] = raw_evalsha(server, s)
        server.client().flushall()
        figures["raw_evalsha_rate_limited_per_s"] = raw_evalsha(server, s, RAW_RATE_ARGS)
        figures["redis_ping_p50_ms"] = ping_p50_ms(server)
        floor_op = redis_cost.floor(server)
        figures.update(settle_learned_ratio(server))
        server.client().flushall()

        b64, b1, _ = measure_bare(server, s)
        # The same endpoint plus one pipelined EVALSHA of a script that returns at once:
        # what the round trip through Redis costs before any budget logic.
        r64, r1, calls = measure_bare(server, s, through_redis=True)
        # Shows the baseline really went through Redis: one EVALSHA per request.
        figures["bare_redis_commands_per_request"] = calls / (r64.requests_per_s * s)
        server.client().flushall()

        with serving(server, config) as (base, pid):
            # authorize, pairs and check at 64 connections, with Redis's CPU and
            # commandstats deltas around each run (bench.redis_cost), and the CPU the
            # sidecar, Redis and wrk spent per authorize
            watch = {"server": pid, "redis": server.process.pid}  # type: ignore[union-attr]
            cost = redis_cost.measure_running(server.client(), base, s, watch=watch)
            a64, pair, check = (cost.runs[k] for k in ("authorize_64", "pair_64", "check_64"))
            figures["redis_cpu_us_per_decision"] = cost.authorize.cpu_us
            figures["redis_commands_per_decision"] = cost.authorize_commands
            a1 = wrk(base + "/v1/authorize", BENCH / "wrk_authorize.lua", 1, s)
            five = wrk(base + "/v1/authorize", BENCH / "wrk_authorize5.lua", 64, s)
            through_proxy = proxy.measure(base, s)
        workers2 = authorize_64(server, config, s, workers=2)
        # The same authorize with the fast path off: aiohttp serves the hot routes too.
        aiohttp_config = workdir / "bench-aiohttp.yaml"
        aiohttp_config.write_text(CONFIG + "  fast_http: false\n")
        slow64 = authorize_64(server, aiohttp_config, s)
        limited_config = workdir / "bench-rate-limited.yaml"
        limited_config.write_text(CONFIG + RATE_LIMITS)
        limited = authorize_64(server, limited_config, s)

        # The same Redis figures with one guard of each kind (redis_cost.GUARDS_CONFIG).
        guarded = redis_cost.guarded_redis_cost(server, workdir, CONFIG, s)
    finally:
        server.cleanup()

    figures.update(
        bare_64_per_s=b64.requests_per_s, bare_64_p50_ms=b64.p50_ms, bare_64_p99_ms=b64.p99_ms,
        bare_1_p50_ms=b1.p50_ms,
        bare_redis_64_per_s=r64.requests_per_s, bare_redis_64_p50_ms=r64.p50_ms,
        bare_redis_64_p99_ms=r64.p99_ms, bare_redis_1_p50_ms=r1.p50_ms,
        authorize_64_per_s=a64.requests_per_s, authorize_64_p50_ms=a64.p50_ms,
        authorize_64_p99_ms=a64.p99_ms, authorize_1_p50_ms=a1.p50_ms,
        authorize_1_p99_ms=a1.p99_ms,
        aiohttp_path_64_per_s=slow64.requests_per_s, aiohttp_path_64_p50_ms=slow64.p50_ms,
        aiohttp_path_64_p99_ms=slow64.p99_ms,
        # A pair run is half authorizes, half settles: a settle's share of its time is
        # what is left after an authorize's (from the authorize-only run).
        settle_64_per_s=1 / (2 / pair.requests_per_s - 1 / a64.requests_per_s),
        pair_64_per_s=pair.requests_per_s, pair_64_p50_ms=pair.p50_ms, pair_64_p99_ms=pair.p99_ms,
        pair_64_decisions_per_s=pair.requests_per_s / 2,
        proxy_64_per_s=through_proxy["requests_per_s"], proxy_64_p50_ms=through_proxy["p50_ms"],
        proxy_64_p99_ms=through_proxy["p99_ms"], proxy_64_non_2xx=through_proxy["non_2xx"],
        limited_64_per_s=limited.requests_per_s, limited_64_p50_ms=limited.p50_ms,
        limited_64_p99_ms=limited.p99_ms,
        check_64_per_s=check.requests_per_s, check_64_p50_ms=check.p50_ms,
        check_64_p99_ms=check.p99_ms,
        five_64_per_s=five.requests_per_s, five_64_p50_ms=five.p50_ms, five_64_p99_ms=five.p99_ms,
        workers2_64_per_s=workers2.requests_per_s, workers2_64_p50_ms=workers2.p50_ms,
        workers2_64_p99_ms=workers2.p99_ms,
    )  # fmt: skip
    for prefix, run in (("bare", b64), ("authorize", a64)):
        for name, (user_us, sys_us) in run.cpu_us.items():
            figures[f"{prefix}_cpu_{name}_user_us"] = user_us
            figures[f"{prefix}_cpu_{name}_sys_us"] = sys_us
    figures.update(cost.figures())
    figures.update(redis_floor_cpu_us=floor_op.cpu_us, redis_floor_script_us=floor_op.script_us)
    if guarded is not None:
        figures.update(guarded.figures("guarded_"))
    report(figures, s, pair.extra.strip())
    cpu_report(figures)
    redis_cost.report(cost, floor_op, guarded)
    if args.instructions:
        counted = instructions.measure(config)
        shutil.rmtree(workdir, ignore_errors=True)
        figures.update(counted)
        bare_i = counted["bare_instructions_per_request"]
        auth_i = counted["authorize_instructions_per_request"]
        print("instructions per request (valgrind callgrind, 2000 requests, 64 connections):")
        print(f"  {'bare aiohttp+msgspec POST':<46} {bare_i:>9,.0f}")
        print(f"  {'sidecar authorize':<46} {auth_i:>9,.0f}")
        print(f"  {'bare / authorize (CPU-bound throughput ratio)':<46} {bare_i / auth_i:.2f}")
        redis_counts = redis_instructions.measure(CONFIG)
        figures.update(redis_counts.figures())
        redis_instructions.report(redis_counts)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
