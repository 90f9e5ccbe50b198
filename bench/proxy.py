"""The proxy hook under load: wrk against /ext_authz/... with identity headers.

`measure()` is called by bench/run.py next to the JSON route; by hand, against a running
sidecar whose config has the bench's budgets and price (see bench/run.py CONFIG):

    python -m bench.proxy --url http://127.0.0.1:8787 --seconds 5

prints both routes and their ratio. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parent
EXT_AUTHZ_LUA = BENCH / "wrk_ext_authz.lua"
AUTHORIZE_LUA = BENCH / "wrk_authorize.lua"
# What Envoy would send for a client's POST /v1/chat/completions.
CHECK_PATH = "/ext_authz/v1/chat/completions"


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if match is None:
        raise ValueError(f"not a wrk latency: {value!r}")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk output lacks {pattern!r}:\n{text}")
    return match.group(1)


def run_wrk(url: str, script: Path, seconds: int, connections: int = 64) -> dict[str, float]:
    """requests_per_s, p50_ms, p99_ms and non_2xx (answers that were not 2xx) of one run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_s": float(_field(r"Requests/sec:\s+([\d.]+)", out)),
        "p50_ms": _ms(_field(r"\s50%\s+(\S+)", out)),
        "p99_ms": _ms(_field(r"\s99%\s+(\S+)", out)),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def measure(base_url: str, seconds: int) -> dict[str, float]:
    """Decisions/s and latency through the proxy route, 64 connections (as the JSON run).

    Every check holds (the bench's budgets are large); `non_2xx` > 0 means denials or
    errors crept in and the figure is not a decision rate.
    """
    return run_wrk(base_url.rstrip("/") + CHECK_PATH, EXT_AUTHZ_LUA, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8787")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    proxy = measure(args.url, args.seconds)
    json_route = run_wrk(args.url.rstrip("/") + "/v1/authorize", AUTHORIZE_LUA, args.seconds)
    for label, r in (("POST /v1/authorize (JSON)", json_route), (CHECK_PATH, proxy)):
        print(
            f"  {label:<36} {r['requests_per_s']:>9,.0f} /s  p50 {r['p50_ms']:.2f} ms"
            f"  p99 {r['p99_ms']:.2f} ms  non-2xx {r['non_2xx']:.0f}"
        )
    ratio = proxy["requests_per_s"] / json_route["requests_per_s"]
    print(f"  proxy route / JSON route: {ratio:.2f}")


if __name__ == "__main__":
    main()
