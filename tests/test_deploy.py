"""deploy/: Prometheus rules pass promtool's checks and unit tests, every Kubernetes
manifest validates offline against the Kubernetes schemas, and the dashboard, rules,
manifests and Dockerfile name only metrics, settings and commands the code has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli import _parser
from sidecar.metrics import Metrics
from tests.harness import REPO, missing

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "budget-sidecar-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "budget-sidecar-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "budget-sidecar.json"
K8S = DEPLOY / "kubernetes"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool (Debian package prometheus)")
    assert found is not None
    return found


def test_promtool_check_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_promtool_rule_unit_tests() -> None:
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True,
                         text=True, timeout=60, cwd=RULE_TESTS.parent)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_cover_what_the_issue_asks() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert sorted(r["alert"] for r in rules) == [
        "BudgetSidecarBudgetAt80Percent",
        "BudgetSidecarBudgetExhausted",
        "BudgetSidecarBudgetForecastToRunOut",
        "BudgetSidecarDenialSpike",
        "BudgetSidecarFailOpen",
        "BudgetSidecarRedisErrors",
        "BudgetSidecarRedisEvicts",
        "BudgetSidecarStoreStateLost",
    ]


def exposed_metric_names() -> set[str]:
    """Every sample name /metrics can show (families with their _total/_bucket/...)."""
    metrics = Metrics()
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    # Histograms and labelled series without observations still declare their family.
    for family in metrics.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bbudget_sidecar_[a-z_]+", expr))


def test_dashboard_and_rules_use_only_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        r["expr"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    ]
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used - exposed == set()
    # What the issue asks the dashboard to show.
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for words in ("Spend over time", "provider/model", "Budget usage %", "Denials",
                  "p50 / p99", "Redis errors", "Budget usage and forecast over time"):  # fmt: skip
        assert words in titles
    assert "budget_sidecar_llm_cost_usd_total" in used
    assert "budget_sidecar_llm_tokens_total" in used


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate (pip install -e '.[dev]')")
        raise
    version = kubernetes_validate.latest_version()
    checked = []
    for _path, doc in manifests():
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: no schema ships offline; checked below against the Deployment
        # strict: an unknown or misplaced field fails, not only a wrong type. The schemas
        # ship inside the package: nothing is fetched.
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(f"{doc['kind']}/{doc['metadata']['name']}")
    assert sorted(checked) == [
        "ConfigMap/budget-sidecar-budgets",
        "Deployment/example-agent",
        "NetworkPolicy/budget-redis",
        "NetworkPolicy/example-agent",
        "Secret/budget-sidecar-redis",
        "Service/budget-redis",
        "StatefulSet/budget-redis",
    ]


def test_a_broken_manifest_fails_validation() -> None:
    import kubernetes_validate

    doc = next(d for _, d in manifests() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(doc))
    broken["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"]["httpGet"][
        "pathh"
    ] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def sidecar_container() -> dict[str, Any]:
    doc = next(d for _, d in manifests() if d["kind"] == "Deployment")
    containers = doc["spec"]["template"]["spec"]["initContainers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "budget-sidecar")
    return found


def test_deployment_is_true_to_the_code() -> None:
    docs = manifests()
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    c = sidecar_container()
    assert c["restartPolicy"] == "Always"  # a native sidecar: stopped after the agent
    assert c["args"] == ["serve"]
    # Every env var the manifest sets is one `budget-sidecar serve` reads.
    env = {e["name"] for e in c["env"]}
    from sidecar import cli

    cli._parser()  # fills cli.SERVE_ENV: flag -> environment variable
    for name in env:
        assert name in cli.SERVE_ENV.values(), name
    assert {"SIDECAR_CONFIG", "REDIS_URL"} <= env
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # The config is a directory mount of the ConfigMap (subPath would never update).
    config_path = Path(next(e["value"] for e in c["env"] if e["name"] == "SIDECAR_CONFIG"))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    assert "subPath" not in mount
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = next(d for _, d in docs if d["kind"] == "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    # The secret holds REDIS_URL.
    secret = next(d for _, d in docs if d["kind"] == "Secret")
    ref = next(e for e in c["env"] if e["name"] == "REDIS_URL")["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_configmap_budgets_are_a_valid_config(tmp_path: Path) -> None:
    from sidecar import config

    configmap = next(d for _, d in manifests() if d["kind"] == "ConfigMap")
    path = tmp_path / "budgets.yaml"
    path.write_text(configmap["data"]["budgets.yaml"])
    cfg = config.load(path)
    assert [b.id for b in cfg.budgets] == ["org-monthly", "each-agent-daily"]


def test_podmonitor_and_networkpolicy_select_the_sidecar_pods() -> None:
    docs = manifests()
    pod = next(d for _, d in docs if d["kind"] == "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    port = sidecar_container()["ports"][0]
    monitor = next(d for _, d in docs if d["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    policy = next(
        d
        for _, d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "example-agent"
    )
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == port["containerPort"]


def test_dockerfile_runs_serve_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["budget-sidecar"]' in text and 'CMD ["serve"]' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "FROM python:3.11-slim" in text
    # The console script and the subcommand exist.
    assert 'budget-sidecar = "sidecar.cli:main"' in (REPO / "pyproject.toml").read_text()
    assert _parser().parse_args(["serve"]).command == "serve"
    # The sidecar container of the Deployment runs as the image's user.
    c = sidecar_container()
    assert c["securityContext"]["runAsNonRoot"] is True
