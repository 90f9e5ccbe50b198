"""A real Prometheus server (Debian's) scrapes a real sidecar on loopback; a PromQL query
of the cost counter returns exactly what the test charged."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness import RedisServer, SidecarProcess, free_port, missing, wait_until

DOC = {"pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
                    "output_per_1k": 0.01}]}  # fmt: skip


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        result: dict[str, Any] = json.load(r)
        return result


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.slow
def test_prometheus_scrapes_the_cost_counter(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus (Debian package)")
    assert binary is not None
    sidecar = SidecarProcess(redis_server.url, str(write_config(DOC)))
    prom_port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bs-prom-"))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: budget-sidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar.port}']}}]\n"
    )
    prometheus: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "prometheus.log").open("wb")
    try:
        sidecar.start()
        # Charge a known cost: a reservation settled by tokens (1000 in, 500 out of gpt-4o:
        # 0.0025 + 0.005) and a recorded cost of 1.25.
        a = _post(sidecar.url + "/v1/authorize", {"provider": "openai", "model": "gpt-4o",
                                                  "estimated_usd": 0.5})  # fmt: skip
        _post(sidecar.url + "/v1/settle", {"reservation_id": a["reservation_id"],
                                           "tokens_in": 1000, "tokens_out": 500})  # fmt: skip
        _post(sidecar.url + "/v1/record", {"provider": "openai", "model": "gpt-4o",
                                           "cost_usd": 1.25})  # fmt: skip
        prometheus = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{prom_port}"
        promql = 'sum(budget_sidecar_llm_cost_usd_total{provider="openai",model="gpt-4o"})'

        def scraped() -> bool:
            assert prometheus is not None and prometheus.poll() is None, "prometheus exited"
            try:
                return bool(_query(base, promql))
            except OSError:
                return False

        wait_until(scraped, timeout_s=30, what="prometheus scraped the sidecar")
        [sample] = _query(base, promql)
        assert float(sample["value"][1]) == pytest.approx(1.2575, abs=1e-12)
        [tokens] = _query(base, 'budget_sidecar_llm_tokens_total{model="gpt-4o",type="input"}')
        assert tokens["value"][1] == "1000"
        [up] = _query(base, 'up{job="budget-sidecar"}')
        assert up["value"][1] == "1"
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        log.close()
        sidecar.cleanup()
        shutil.rmtree(data, ignore_errors=True)
