"""`make bench-peers`: the sidecar next to a peer, in the same run on the same machine.

The peer is Node's rate-limiter-flexible over ioredis (bench/peers/rlf_server.js), the
library teams reach for to gate calls: POST /v1/check with the same JSON body the
sidecar's check gets, one key (the body's user_id) consuming one point, a short JSON
answer. Both talk to the same throwaway redis-server on 127.0.0.1; wrk (-t1, 64
connections) drives each in turn, `--rounds` times, so drift on a shared machine falls on
both. Printed: each one's throughput and latency, Redis CPU per decision, and the sidecar's
3-budget authorize (and its check) as a ratio to the peer (issue 20's goal: >= 1.0).

Needs node and npm; runs `npm ci` in bench/peers when node_modules is missing. Not part of
`make test` or CI. Every process listens on 127.0.0.1 and is stopped by its pid; the run
stops by itself (about 3 x rounds x seconds + start-up). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from statistics import mean

from bench import redis_cost
from bench.load import WrkResult, sidecar_cmd, start, stop, warm_up, wrk
from bench.run import CONFIG
from tests.harness import RedisServer, free_port

PEERS = Path(__file__).resolve().parent
BENCH = PEERS.parent
RLF_SERVER = PEERS / "rlf_server.js"


def node_ready() -> str:
    """The node binary, with the peer's packages installed (npm ci when they are not)."""
    node = shutil.which("node")
    if node is None:
        sys.exit("bench-peers needs node and npm (apt-get install nodejs npm); not found on PATH")
    if not (PEERS / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("bench-peers needs npm to install bench/peers/node_modules (npm ci)")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True, timeout=300
        )  # fmt: skip
    return node


def start_peer(node: str, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = start(
        [node, str(RLF_SERVER), "--port", str(port), "--redis-url", redis_url],
        f"http://127.0.0.1:{port}/healthz",
    )
    return proc, f"http://127.0.0.1:{port}"


def _ok(name: str, result: WrkResult) -> WrkResult:
    if "non-2xx" in result.extra:  # a failing server must not read as a fast one
        sys.exit(f"{name} answered errors ({result.extra.strip()})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, interleaved")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench-peers needs wrk (apt-get install wrk)")
    node = node_ready()
    s = args.seconds

    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="bs-bench-peers-"))
    config = workdir / "bench.yaml"
    config.write_text(CONFIG)
    rounds: list[dict[str, float]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        procs.append(
            start(sidecar_cmd(port, server.url, config), f"http://127.0.0.1:{port}/healthz")
        )
        sidecar = f"http://127.0.0.1:{port}"
        peer_proc, peer = start_peer(node, server.url)
        procs.append(peer_proc)
        warm_up(sidecar)
        wrk(peer + "/v1/check", BENCH / "wrk_check.lua", 64, 2)  # V8's JIT warms up too
        client = server.client()
        peer_answers = 0
        for _ in range(args.rounds):
            row: dict[str, float] = {}
            for name, url, script in (
                ("sidecar_authorize", sidecar + "/v1/authorize", "wrk_authorize.lua"),
                ("peer_check", peer + "/v1/check", "wrk_check.lua"),
                ("sidecar_check", sidecar + "/v1/check", "wrk_check.lua"),
            ):
                result, spent = redis_cost.during(client, partial(wrk, url, BENCH / script, 64, s))
                _ok(name, result)
                if name == "peer_check":
                    peer_answers += result.requests
                row[f"{name}_per_s"] = result.requests_per_s
                row[f"{name}_p50_ms"] = result.p50_ms
                row[f"{name}_p99_ms"] = result.p99_ms
                row[f"{name}_redis_cpu_us"] = spent.cpu_us / result.requests
            rounds.append(row)
        # The peer really decided in Redis: its key holds at least one point per answer
        # (plus the warm-up's and any in flight when wrk stopped).
        consumed = int(client.get("rlf:user-1") or 0)
    finally:
        for proc in reversed(procs):
            stop(proc)
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    figures = {key: mean(r[key] for r in rounds) for key in rounds[0]}
    figures["peer_points_consumed"] = consumed
    figures["peer_answers_measured"] = peer_answers
    report(figures, rounds, s)
    if args.json:
        Path(args.json).write_text(json.dumps({"mean": figures, "rounds": rounds}, indent=2))


def report(f: dict[str, float], rounds: list[dict[str, float]], seconds: int) -> None:
    def line(label: str, prefix: str) -> None:
        print(
            f"  {label:<44} {f[prefix + '_per_s']:>9,.0f} /s  p50 {f[prefix + '_p50_ms']:.2f} ms"
            f"  p99 {f[prefix + '_p99_ms']:.2f} ms  Redis {f[prefix + '_redis_cpu_us']:.1f} µs CPU"
        )

    print(
        f"budget-sidecar vs peers ({len(rounds)} rounds of {seconds} s each, wrk -t1, "
        "64 connections, loopback, one redis-server)"
    )
    line("sidecar authorize (3 stacked budgets)", "sidecar_authorize")
    line("sidecar check (3 stacked budgets)", "sidecar_check")
    line("node rate-limiter-flexible + ioredis (1 key)", "peer_check")
    print(
        f"  {'peer points consumed in Redis':<44} {f['peer_points_consumed']:>9,.0f}"
        f"  (>= {f['peer_answers_measured']:,.0f} answers measured, plus the warm-up)"
    )
    print("ratios (sidecar / peer throughput; goal for authorize >= 1.0):")
    per_round = ", ".join(
        f"{r['sidecar_authorize_per_s'] / r['peer_check_per_s']:.2f}" for r in rounds
    )
    print(
        f"  {'authorize / rate-limiter-flexible':<44}"
        f" {f['sidecar_authorize_per_s'] / f['peer_check_per_s']:.2f}  (rounds: {per_round})"
    )
    print(
        f"  {'check / rate-limiter-flexible':<44}"
        f" {f['sidecar_check_per_s'] / f['peer_check_per_s']:.2f}"
    )
    print(
        f"  {'Redis CPU: authorize / peer check':<44}"
        f" {f['sidecar_authorize_redis_cpu_us'] / f['peer_check_redis_cpu_us']:.2f}"
    )


if __name__ == "__main__":
    main()
