"""`make bench-memory`: bytes of Redis per entity, measured on a real redis-server.

The workload of issue 16: N entities (users), each with a per-user daily budget and a
per-user request limit, each making one authorized and settled call a day, for several
simulated days (a fake clock drives the engine in-process; Redis is real). Then the
steady state is measured: every key of the tenant counted, two ways.

- INFO used_memory delta (before the first call, after the last day): what the process
  really holds, allocator rounding, the keyspace's own dict entries, hash tables that grew
  in powers of two. This is the figure asserted (tests/test_memory.py), because it is
  what a Redis maxmemory is compared with.
- MEMORY USAGE of every key (SAMPLES 0: every element), summed per kind of key, for the
  breakdown: which structure costs what, and index bytes next to what they index.

The steady state: the run lasts long enough that everything with a retention of a day
or less has reached its equilibrium (finished reservations are kept
settings.keep_finished_ms, counters of past windows go once their grace has passed, idle
rate limiters go once back at zero), and the background sweep has run as it would. The
usage ledger is a stream capped per tenant (usage_max_records), so it is reported per
record, not per entity; the daily aggregates are reported per day. See
/work/notes/readme-i16m.md for the table these figures fill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis

from sidecar import config as config_mod
from sidecar.clock import FakeClock
from sidecar.engine import Engine
from sidecar.schemas import AuthorizeRequest, SettleRequest
from sidecar.scripts import Scripts
from sidecar.store import RedisStore

DAY_MS = 86_400_000
# 2026-03-10T00:00:00Z
T0_MS = 1_773_100_800_000
TENANT = "default"


def doc(**settings: Any) -> dict[str, Any]:
    return {
        "budgets": [
            {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 10,
             "period": "daily"},
        ],
        "rate_limits": [
            {"id": "rpm", "scope": "user", "metric": "requests", "limit": 60, "window": "1m"},
        ],
        "pricing": [
            {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
             "output_per_1k": 0.01},
        ],
        "settings": {"redis_timeout_ms": 60_000, **settings},
    }  # fmt: skip


@dataclass
class Measured:
    entities: int
    days: int
    used_memory_delta: int
    by_kind: dict[str, int] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)
    sweep_s: float = 0.0

    @property
    def per_entity(self) -> float:
        return self.used_memory_delta / self.entities

    def as_dict(self) -> dict[str, Any]:
        return {
            "entities": self.entities,
            "days": self.days,
            "used_memory_delta": self.used_memory_delta,
            "bytes_per_entity": round(self.per_entity, 1),
            "memory_usage_by_key_kind": self.by_kind,
            "elements_by_key_kind": self.fields,
            "sweep_s": round(self.sweep_s, 2),
        }


def kind_of(key: str) -> str:
    """The kind of a tenant key: its name after the hash tag, without a day or window."""
    rest = key.split("}:", 1)[1]
    return rest.split(":", 1)[0] if not rest.startswith("agg") else rest.rsplit(":", 1)[0]


def key_sizes(client: redis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    by_kind: dict[str, int] = defaultdict(int)
    elements: dict[str, int] = defaultdict(int)
    for key in client.scan_iter(match="bs:*", count=1000):
        k = str(key)
        kind = kind_of(k)
        by_kind[kind] += int(client.memory_usage(k, samples=0) or 0)
        t = client.type(k)
        n = {
            "hash": client.hlen,
            "zset": client.zcard,
            "stream": client.xlen,
        }.get(str(t))
        if n is not None:
            elements[kind] += int(n(k))
    return dict(by_kind), dict(elements)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def run_day(
    engine: Engine, clock: FakeClock, day_start: int, entities: int, concurrency: int
) -> None:
    """Each entity's one call of the day, spread evenly over the day, in order."""
    step = DAY_MS // entities

    async def one(i: int) -> None:
        d = await engine.authorize(
            TENANT,
            AuthorizeRequest(
                user_id=f"user-{i:06d}", provider="openai", model="gpt-4o",
                estimated_tokens_in=1000, estimated_tokens_out=500,
            ),
        )  # fmt: skip
        assert d.allowed and d.reservation_id, d
        s = await engine.settle(
            TENANT, SettleRequest(reservation_id=d.reservation_id, tokens_in=900, tokens_out=400)
        )
        assert s.state == "settled", s

    for first in range(0, entities, concurrency):
        clock.set(day_start + first * step)
        await asyncio.gather(*(one(i) for i in range(first, min(first + concurrency, entities))))


async def measure(
    url: str, *, entities: int = 20_000, days: int = 3, concurrency: int = 200,
    settings: dict[str, Any] | None = None, sweep: bool = True,
) -> Measured:  # fmt: skip
    """Run the workload against the (empty) Redis at `url` and measure its steady state."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.flushall()
        # The ledger is capped per tenant, not per entity: hold one day of records (one
        # per entity), so that each entity carries its day's record.
        cfg = config_mod.parse(
            doc(**{"usage_max_records": entities, **(settings or {})}), "<bench.memory>"
        )
        store = RedisStore.from_url(url, timeout_ms=60_000)
        clock = FakeClock(T0_MS)
        scripts = Scripts.load_all()
        for s in scripts:
            client.script_load(s.source)
        engine = Engine(cfg, store, clock, scripts)
        before = used_memory(client)
        try:
            for day in range(days):
                await run_day(engine, clock, T0_MS + day * DAY_MS, entities, concurrency)
            clock.set(T0_MS + days * DAY_MS - 1)
            t0 = time.perf_counter()
            if sweep:
                await _sweep_all(engine, store, clock)
            swept_s = time.perf_counter() - t0
        finally:
            await engine.close()
            await store.close()
        after = used_memory(client)
        by_kind, elements = key_sizes(client)
        return Measured(entities, days, after - before, by_kind, elements, swept_s)
    finally:
        client.close()


async def _sweep_all(engine: Engine, store: RedisStore, clock: FakeClock) -> None:
    """What the background sweep does over time, done at once: sweep until it reports
    nothing left to look at this round (bounded calls, each bounded)."""
    try:
        from sidecar.sweep import Sweeper
    except ImportError:  # the code before the sweep existed
        return
    sweeper = Sweeper(engine, store)
    await sweeper.sweep_until_done(TENANT)


def main(argv: list[str] | None = None) -> int:
    from tests.harness import RedisServer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=int, default=20_000)
    p.add_argument("--days", type=int, default=3)
    a = p.parse_args(argv)
    server = RedisServer().start()
    try:
        m = asyncio.run(measure(server.url, entities=a.entities, days=a.days))
    finally:
        server.cleanup()
    json.dump(m.as_dict(), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
