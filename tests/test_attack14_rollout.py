"""A rolling deploy: replicas with different config files over one Redis at once. Config-file
budgets live in each replica's memory and the limit travels with each call (authorize.lua
compares the shared counter with the limit the calling replica sends), so during a rollout
each replica enforces its own file: the total is bounded by the highest limit among the live
replicas, a replica without the budget does not enforce it at all, and a changed period
counts in another window. Settles follow the reservation, never the settling replica's file.
(README, Operations: use the admin API for a change that must hold on every replica at once.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.harness import RedisServer, request_json, wait_until
from tests.test_attack14_crash import authorize_many
from tests.test_attack14_replicas import CENT, cap_doc, replicas, used_held


async def test_replicas_with_different_files_each_enforce_their_own(
    server: RedisServer, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    rc = server.client()
    old = write_config(cap_doc(1.0), "old.yaml")
    new = write_config(cap_doc(0.5), "new.yaml")
    bare = write_config({"settings": {"redis_timeout_ms": 5000}}, "bare.yaml")
    with replicas(server.url, [old, new, bare], 3) as (o, n, x):
        # 60 through the new replica first: it stops at its $0.50.
        first = await authorize_many([n.url], 60, lease_ms=600_000)
        assert sum(d["allowed"] for d in first) == 50
        # The old one grants on up to its $1.00; the new one then grants nothing.
        mixed = await authorize_many([o.url, n.url], 120, lease_ms=600_000)
        by = {o.url: 0, n.url: 0}
        for i, d in enumerate(mixed):
            by[[o.url, n.url][i % 2]] += d["allowed"]
        assert by == {o.url: 50, n.url: 0}
        assert used_held(rc) == (0, 100 * CENT)  # the higher limit, exactly, never past it
        # A replica whose file has no budget does not enforce it (and holds nothing on it).
        free = await authorize_many([x.url], 10, lease_ms=600_000)
        assert all(d["allowed"] and d["budget_info"] is None for d in free)
        assert used_held(rc) == (0, 100 * CENT)
        # A settle through it still charges the reservation's own counter, exactly once.
        rid = first[0]["reservation_id"]
        for url in (x.url, n.url):
            status, s = request_json(url + "/v1/settle", {"reservation_id": rid, "cost_usd": 0.03})
            assert status == 200 and s["cost_usd"] == 0.03, s
        assert used_held(rc) == (3 * CENT, 99 * CENT)

        # The new file moves the budget to a daily period (hot reload): the month's spend
        # is in another window, so the new replica counts from zero.
        new.write_text(yaml.safe_dump(cap_doc(0.5) | {"budgets": [
            {**cap_doc(0.5)["budgets"][0], "period": "daily"}]}))  # fmt: skip

        def daily() -> bool:
            _, d = request_json(n.url + "/v1/check", {"estimated_usd": 0.01})
            return bool(d["budgets"] and d["budgets"][0]["period"] == "daily")

        wait_until(daily, what="the new replica on the daily budget")
        again = await authorize_many([n.url], 60, lease_ms=600_000)
        assert sum(d["allowed"] for d in again) == 50
        _, status = request_json(o.url + "/v1/budgets/cap/status")
        assert (status["used_usd"], status["held_usd"]) == (0.03, 0.99)
        rc.close()
