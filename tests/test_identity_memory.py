"""Attack on "memory stays bounded" when every call comes from a new identity.

A sidecar memoises per identity (sidecar/resolution.py's resolution memo, the parsed
counters of sidecar/rendering.py, sidecar/guards.py's log throttle, the metrics' label
children, sidecar/pricing.py's provider memo, sidecar/resp.py's encoded chunks, the
histograms' observations waiting for their bulk count (sidecar/tally.py), the key caches
of sidecar/keys.py). Each has a cap; a structure without one would grow with every
new user_id, agent_id, run_id, fingerprint or model until the pod is OOM-killed.

1. In-process, over a real redis-server, with the caps lowered (so a few hundred
   identities cross each of them): every container the app reaches is looked at after
   two equal batches of new identities; none may grow by a third of a batch (what a
   per-identity structure does) unless it is a bounded functools.lru_cache, and each
   known cache stays at or under its cap.
2. A real `python -m sidecar serve`: /metrics exposes the same series after 500 new
   identities as after the first 50 (no identity became a label). The RSS per identity
   of 50,000 identities is measured by bench/identities.py (python -m bench.identities).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench import identities
from sidecar import guards, metrics, pricing, rendering, resolution, resp, tally
from sidecar.api.app import ENGINE, create_app
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer, SidecarProcess

CAP = 50  # every lowered cap
BATCH = 200  # identities per batch: past each cap, and a third of it (66) past CAP too


def containers(*roots: object) -> dict[int, tuple[int, Any]]:
    """Every dict, set and list with at least CAP // 2 items reachable from `roots` (the
    app, its metrics) and from the sidecar's own modules. Not the whole process: other
    tests' libraries (litellm's background threads importing lazily) grow their own
    caches meanwhile. The walk does not enter other packages' modules, nor classes."""
    gc.collect()
    ours = [m for name, m in sys.modules.items() if name.partition(".")[0] == "sidecar"]
    stack: list[object] = [*roots, *(vars(m) for m in ours)]
    seen: set[int] = set()
    found = {}
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        # (The event loop's timer heap holds what is asleep now: bounded by concurrency.)
        if isinstance(o, types.ModuleType | type | asyncio.AbstractEventLoop):
            continue
        if isinstance(o, dict | set | list) and len(o) >= CAP // 2:
            found[id(o)] = (len(o), o)
        stack.extend(gc.get_referents(o))
    return found


def bounded_lru(o: object) -> bool:
    """Whether `o` is the cache of a functools.lru_cache with a maxsize."""
    return any(
        isinstance(r, functools._lru_cache_wrapper) and r.cache_info().maxsize is not None  # type: ignore[attr-defined]
        for r in gc.get_referrers(o)
    )


async def test_nothing_in_process_grows_with_identities_past_its_cap(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module, name in ((resolution, "_MEMO_SIZE"), (rendering, "_APPLIED_MAX"),
                         (guards, "_LOGGED_MAX"), (pricing, "_MEMO_SIZE"),
                         (metrics, "_LABEL_CACHE_SIZE"), (resp, "_CHUNKS_MAX"),
                         (tally, "_FOLD_AT")):  # fmt: skip
        monkeypatch.setattr(module, name, CAP)
    # The guards' warnings kept from pytest's log capture (which keeps every record).
    monkeypatch.setattr(guards.guard_log, "propagate", False)
    events = Metrics()
    store = RedisStore.from_url(redis_server.url, timeout_ms=10_000)
    app = create_app(make_config(identities.DOC), store, events=events)
    client = TestClient(TestServer(app))
    await client.start_server()
    url = str(client.make_url("")).rstrip("/")
    try:
        await identities.drive(url, 0, BATCH)
        first = containers(app, events, store)
        await identities.drive(url, BATCH, 2 * BATCH)
        second = containers(app, events, store)
        grown = []
        for key, (n, o) in second.items():
            n_first = first.get(key, (0, None))[0]
            if n - n_first > BATCH // 3 and o is not first and not bounded_lru(o):
                grown.append((n_first, n, repr(o)[:160]))
        assert grown == [], grown
        # The known caches: filled by these identities, and each at most its cap.
        engine = app[ENGINE]
        sizes = {
            "resolution memo": len(engine._resolver._memo),
            "parsed counters": len(rendering._APPLIED),
            "guard log throttle": len(guards._logged),
            "spend label children": len(events._spend_children),
            "RESP chunks": len(resp._CHUNKS),
        }
        assert all(0 < n <= CAP for n in sizes.values()), sizes
    finally:
        await client.close()


def test_a_real_sidecars_metrics_series_do_not_grow_with_identities(
    redis_server: RedisServer, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    sidecar = SidecarProcess(redis_server.url, str(write_config(identities.DOC)))
    try:
        sidecar.start()
        first = 1_000_000  # identities no other test of this Redis used
        asyncio.run(identities.drive(sidecar.url, first, first + 50))
        before = asyncio.run(identities.series(sidecar.url))
        asyncio.run(identities.drive(sidecar.url, first + 50, first + 550))
        after = asyncio.run(identities.series(sidecar.url))
        assert after == before, (before, after)
        assert sidecar.process is not None and sidecar.process.poll() is None
    finally:
        sidecar.cleanup()
