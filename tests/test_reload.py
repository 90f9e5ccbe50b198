"""Config hot reload: a ConfigMap-style symlink swap changes enforcement in a running
sidecar; a broken file keeps the last good config, names the file and field, and counts
a failed reload."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from sidecar import config
from sidecar.clock import FakeClock
from sidecar.engine import Engine
from sidecar.reload import ConfigWatcher
from sidecar.scripts import Scripts
from sidecar.store import RedisStore
from tests.conftest import T0_MS
from tests.harness import RedisServer, SidecarProcess, wait_until
from tests.test_metrics import samples, value


def doc(limit_usd: float) -> dict[str, Any]:
    return {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization",
                         "limit_usd": limit_usd, "period": "monthly"}]}  # fmt: skip


class ConfigMapDir:
    """A directory laid out as the kubelet lays out a mounted ConfigMap:
    budgets.yaml -> ..data/budgets.yaml, ..data -> ..<timestamp>/ (swapped atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "budgets.yaml").symlink_to("..data/budgets.yaml")

    @property
    def path(self) -> Path:
        return self.root / "budgets.yaml"

    def publish(self, text: str) -> None:
        self.generation += 1
        version = self.root / f"..2026_03_10_12_00_{self.generation:02d}.000000"
        version.mkdir()
        (version / "budgets.yaml").write_text(text)
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(version.name)
        os.replace(tmp_link, self.root / "..data")  # rename(2): the swap is atomic


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        result: dict[str, Any] = json.load(r)
        return result


def _metrics(url: str) -> Any:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return samples(r.read().decode())


def _reloads(url: str, result: str) -> float:
    return value(_metrics(url), "budget_sidecar_config_reloads_total", result=result)


@pytest.mark.slow
def test_symlink_swap_changes_enforcement_and_broken_file_keeps_it(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    cm = ConfigMapDir(tmp_path)
    cm.publish(yaml.safe_dump(doc(10.0)))
    sidecar = SidecarProcess(redis_server.url, str(cm.path))
    try:
        sidecar.start()
        ask = {"estimated_usd": 2.0}
        assert _post(sidecar.url + "/v1/check", ask)["allowed"] is True

        cm.publish(yaml.safe_dump(doc(1.0)))  # tighter: 2.0 no longer fits
        wait_until(lambda: _post(sidecar.url + "/v1/check", ask)["allowed"] is False,
                   timeout_s=10, what="the tighter budget enforced")  # fmt: skip
        assert _reloads(sidecar.url, "success") == 1
        assert _reloads(sidecar.url, "failure") == 0

        # A broken file: a limit that is not a number.
        broken = yaml.safe_dump(doc(1.0)).replace("limit_usd: 1.0", "limit_usd: lots")
        cm.publish(broken)
        wait_until(lambda: _reloads(sidecar.url, "failure") == 1, timeout_s=10,
                   what="the failed reload counted")  # fmt: skip
        # Still the last good config (1.0), and still serving.
        assert _post(sidecar.url + "/v1/check", ask)["allowed"] is False
        assert _post(sidecar.url + "/v1/check", {"estimated_usd": 0.5})["allowed"] is True
        assert _reloads(sidecar.url, "success") == 1
        errors = [json.loads(line) for line in sidecar.output().splitlines()
                  if line.startswith("{") and '"level":"error"' in line]  # fmt: skip
        [error] = [e for e in errors if e["logger"] == "sidecar.reload"]
        assert error["file"] == str(cm.path)
        assert error["field"] == "$.budgets[0].limit_usd"

        # Fixed again: loosened to 5.0.
        cm.publish(yaml.safe_dump(doc(5.0)))
        wait_until(lambda: _post(sidecar.url + "/v1/check", ask)["allowed"] is True,
                   timeout_s=10, what="the fixed file enforced")  # fmt: skip
        assert _reloads(sidecar.url, "success") == 2
    finally:
        sidecar.cleanup()


async def test_watcher_waits_for_a_stable_file_and_keeps_the_last_good(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(doc(10.0)))
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    engine = Engine(config.load(path), store, FakeClock(T0_MS), Scripts.load_all())
    results: list[bool] = []
    watcher = ConfigWatcher(path, engine, on_result=results.append)
    try:
        assert await watcher.check() is None  # nothing changed
        path.write_text(yaml.safe_dump(doc(3.0)))
        assert await watcher.check() is None  # changed: wait one tick for it to settle
        assert await watcher.check() is True
        assert engine.config.budgets[0].limit_micro == 3_000_000
        assert await watcher.check() is None  # loaded once

        time.sleep(0.01)  # a distinct mtime even on coarse-timestamp filesystems
        path.write_text("budgets: [ {id: cap")  # not YAML
        with caplog.at_level(logging.ERROR, logger="sidecar.reload"):
            assert await watcher.check() is None
            assert await watcher.check() is False
        assert engine.config.budgets[0].limit_micro == 3_000_000
        [record] = caplog.records
        assert record.__dict__["file"] == str(path) and record.__dict__["field"] == "$"
        assert "not valid YAML" in record.getMessage()

        path.unlink()  # a missing file is a failed reload too, reported once
        assert [await watcher.check() for _ in range(3)] == [None, False, None]
        assert results == [True, False, False]
    finally:
        await store.close()
