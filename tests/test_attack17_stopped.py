"""A real sidecar process SIGSTOPped behind each real proxy, then continued; then killed
and started again.

tests/test_transport_attacks.py answers the sidecar's port with a stand-in listener; here
the sidecar is `python -m sidecar serve` itself, so what it does with the check the proxy
gave up on is seen too: while it is stopped the kernel queues that check, and once it
runs again it reads it and decides it, for a proxy that has long answered its client. The
hold that decision makes must not stay (nobody will settle it, and behind these proxies an
unsettled hold is charged its estimate at its lease end): the proxy closed its end, so the
answer is reset and the hold taken back (sidecar.api.undelivered). Then calls pass again.

Traefik is left out: its forwardAuth waits a fixed 30 s for a stopped sidecar
(deploy/traefik/dynamic.yml), too long for this suite; tests/test_transport_attacks.py
covers its answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests import test_proxy_servers
from tests.harness import RedisServer, SidecarProcess, wait_until
from tests.test_proxy_servers import IDENTITY, PRICING, USER_BUDGET, binary_of
from tests.test_transport_attacks import HUNG_STATUS, held_micro, records, used_micro

make_stack = test_proxy_servers.make_stack
# The default estimate of the routes below, in micro-USD.
ESTIMATE_MICRO = 10_000
STOPPED_STATUS = {
    kind: HUNG_STATUS.get(kind, test_proxy_servers.DOWN_STATUS[kind])
    for kind in ("envoy", "nginx", "caddy", "caddy-2.6", "haproxy")
}


# How many times the proxy sends one check that gets no answer.
TRIES = {"haproxy": 4}


@pytest.fixture(params=list(STOPPED_STATUS))
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    binary_of(name)
    return name


@pytest.fixture
def sidecar_of(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Any]:
    procs: list[SidecarProcess] = []

    def start(kind: str) -> SidecarProcess:
        proxy = {
            **test_proxy_servers.shipped_proxy_section(kind),
            "routes": [{"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.01}}],
        }
        path = tmp_path / "sidecar.yaml"
        config = {"budgets": [USER_BUDGET], "pricing": PRICING, "proxy": proxy}
        path.write_text(yaml.safe_dump(config))
        proc = SidecarProcess(redis_server.url, str(path))
        procs.append(proc)
        return proc.start()

    yield start
    for p in procs:
        if p.process is not None:
            os.kill(p.process.pid, signal.SIGCONT)
        p.cleanup()


async def test_a_stopped_or_killed_sidecar_is_refused_charges_nothing_and_passes_once_back(
    make_stack: Any, sidecar_of: Any, redis_client: redis.Redis, kind: str
) -> None:
    sidecar = sidecar_of(kind)
    assert sidecar.process is not None
    pid = sidecar.process.pid
    stack = await make_stack({"budgets": [USER_BUDGET]}, kind, sidecar_port=sidecar.port)

    first = await stack.send(headers=IDENTITY)
    assert first[0] == 200, stack.proxy.output()[-2000:]

    os.kill(pid, signal.SIGSTOP)
    try:
        refused = await asyncio.wait_for(stack.send(headers=IDENTITY), 20)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert refused[0] == STOPPED_STATUS[kind], (refused, stack.proxy.output()[-2000:])
    assert len(stack.seen) == 1

    again = await stack.send(headers=IDENTITY)
    assert again[0] == 200, (again, stack.proxy.output()[-2000:])
    assert len(stack.seen) == 2
    kept = {s.headers["x-budget-reservation-id"] for s in stack.seen}

    def settled_down() -> bool:
        done = records(redis_client)
        return (
            kept <= done.keys()
            and all(v.startswith("R|") for k, v in done.items() if k not in kept)
            and held_micro(redis_client) == 2 * ESTIMATE_MICRO
        )

    try:
        await asyncio.to_thread(wait_until, settled_down, 10, "only the answered calls hold")
    except TimeoutError:
        # What stayed held: the hold of a call the client was refused.
        state = (kept, records(redis_client), held_micro(redis_client))
        raise AssertionError(state) from None
    # The refused call's checks (HAProxy's httpclient sends up to 4), those the sidecar
    # read once it ran again: released, nothing spent.
    assert 2 <= len(records(redis_client)) <= 2 + TRIES.get(kind, 1), records(redis_client)
    assert used_micro(redis_client) == 0

    # kill -9, then started again on its port: refused as a sidecar down, nothing held,
    # and the next call passes through the proxy's pooled connections to the dead one.
    made = len(records(redis_client))
    sidecar.process.kill()
    sidecar.process.wait(10)
    sidecar.process = None
    refused = await asyncio.wait_for(stack.send(headers=IDENTITY), 20)
    assert refused[0] == test_proxy_servers.DOWN_STATUS[kind], refused
    sidecar.start()
    again = await stack.send(headers=IDENTITY)
    assert again[0] == 200, (again, stack.proxy.output()[-2000:])
    assert len(stack.seen) == 3
    assert held_micro(redis_client) == 3 * ESTIMATE_MICRO
    assert len(records(redis_client)) == made + 1
