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


AXONFLOW_DOC = {
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
        {"provider": "anthropic", "model": "claude-3-haiku", "input_per_1k": 0.00025,
         "output_per_1k": 0.00125},
    ],
    "settings": {"axonflow_metrics": True},
}  # fmt: skip
# One round: two gpt-4o calls of 1000 + 500 tokens ($0.0075 each), one claude-3-haiku call
# of 2000 + 400 ($0.001).
ROUND = [("openai", "gpt-4o", 1000, 500), ("openai", "gpt-4o", 1000, 500),
         ("anthropic", "claude-3-haiku", 2000, 400)]  # fmt: skip


def _settle_round(url: str) -> None:
    for provider, model, tokens_in, tokens_out in ROUND:
        a = _post(url + "/v1/authorize", {"provider": provider, "model": model,
                                          "estimated_usd": 0.05})  # fmt: skip
        _post(url + "/v1/settle", {"reservation_id": a["reservation_id"],
                                   "tokens_in": tokens_in, "tokens_out": tokens_out})  # fmt: skip


def _by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"][k] for k in labels): float(r["value"][1]) for r in result}


@pytest.mark.slow
def test_axonflow_dashboards_queries_run_unchanged(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """settings.axonflow_metrics: the AxonFlow docs' PromQL ("cost by provider and model",
    "average tokens per request") against a real Prometheus returns what was settled."""
    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus (Debian package)")
    assert binary is not None
    sidecar = SidecarProcess(redis_server.url, str(write_config(AXONFLOW_DOC)))
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
    base = f"http://127.0.0.1:{prom_port}"

    def scalar(promql: str) -> float | None:
        assert prometheus is not None and prometheus.poll() is None, "prometheus exited"
        try:
            result = _query(base, promql)
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        sidecar.start()
        # The first round before the first scrape: every series exists from its first
        # sample on, so rate() extrapolates all of them alike.
        _settle_round(sidecar.url)
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        calls = "axonflow_orchestrator_llm_calls_total"
        wait_until(lambda: (scalar(f"min(count_over_time({calls}[5m]))") or 0) >= 3,
                   timeout_s=60, what="three scrapes of the first round")  # fmt: skip
        _settle_round(sidecar.url)
        wait_until(lambda: scalar(f"sum({calls})") == 6, timeout_s=60,
                   what="prometheus scraped the second round")  # fmt: skip

        # Cost by provider and model: the totals, and their rate.
        cost = "axonflow_gateway_llm_cost_usd_total"
        totals = _by(_query(base, f"sum by (provider, model) ({cost})"), "provider", "model")
        assert totals == {
            ("openai", "gpt-4o"): pytest.approx(0.03, abs=1e-12),
            ("anthropic", "claude-3-haiku"): pytest.approx(0.002, abs=1e-12),
        }
        rates = _by(_query(base, f"sum by (provider, model) (rate({cost}[5m]))"),
                    "provider", "model")  # fmt: skip
        assert set(rates) == set(totals)
        # The second round added 0.015 and 0.001: extrapolated alike, so 15 to 1.
        ratio = rates[("openai", "gpt-4o")] / rates[("anthropic", "claude-3-haiku")]
        assert ratio == pytest.approx(15, rel=1e-9)

        # Average tokens per request, over all and by provider (the second round: 5400
        # tokens in 3 calls; gpt-4o 1500 a call, claude-3-haiku 2400).
        tokens = "axonflow_gateway_llm_tokens_total"
        average = f"sum(rate({tokens}[5m])) / sum(rate({calls}[5m]))"
        assert scalar(average) == pytest.approx(1800, rel=1e-9)
        per_provider = _by(_query(base, f"sum by (provider) (rate({tokens}[5m])) / "
                                        f"sum by (provider) (rate({calls}[5m]))"),
                           "provider")  # fmt: skip
        assert per_provider == {
            ("openai",): pytest.approx(1500, rel=1e-9),
            ("anthropic",): pytest.approx(2400, rel=1e-9),
        }
        assert scalar(f"sum({tokens}) / sum({calls})") == 1800  # all of both rounds
        # Prompt and completion tokens apart, as the platform labels them.
        by_type = _by(_query(base, f"sum by (type) ({tokens})"), "type")
        assert by_type == {("prompt",): 8000, ("completion",): 2800}
        # The default names are still there, with the same facts.
        assert scalar("sum(budget_sidecar_llm_cost_usd_total)") == pytest.approx(0.032, abs=1e-12)
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
