"""The commands as README shows them (issue #17): `serve --help` names every flag's default
and environment variable and every Redis URL form open_store accepts; `hash-secret` makes
the secret_sha256 a client entry needs (and the sidecar then accepts that secret);
`check-config` gives one verdict on stdout with its exit code; the example config in
deploy/ passes it."""

from __future__ import annotations

import argparse
import base64
import hashlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar import cli, store
from tests.conftest import ClientFactory
from tests.harness import REPO

EXAMPLE = REPO / "deploy" / "budget-sidecar.example.yaml"


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _serve_parser() -> argparse.ArgumentParser:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices["serve"]
    return found


def test_serve_help_names_every_flags_default_and_environment_variable() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    flags = [
        a
        for a in _serve_parser()._actions
        if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings
    ]
    assert len(flags) >= 9
    source = inspect.getsource(cli._parser)
    for action in flags:
        flag = action.option_strings[0]
        # The environment variable the code reads for it, as written in _parser().
        env = re.search(rf'"{flag}",\s*"([A-Z_]+)"', source)
        assert env is not None, flag
        assert re.search(rf"{flag} \S+ .*?\(env {env.group(1)}; default: [^)]+\)", text), flag
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8787"), ("--log-level", "info")]:
        assert re.search(rf"{flag} \S+ .*?; default: {re.escape(default)}\)", text), flag


def test_serve_help_lists_every_redis_url_form_open_store_accepts() -> None:
    done = run_cli("serve", "--help")
    schemes = set(re.findall(r"\b([a-z+]+)://", done.stdout))
    # Every prefix open_store dispatches on, plus the plain forms redis-py reads.
    accepted = set(re.findall(r'"([a-z+]+)://"', inspect.getsource(store.open_store)))
    assert accepted >= {"redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"}
    assert schemes >= accepted | {"redis", "rediss", "unix"}, schemes


def test_env_variables_set_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_PORT", "9911")
    monkeypatch.setenv("SIDECAR_HOST", "127.0.0.2")
    args = cli._parser().parse_args(["serve"])
    assert (args.port, args.host) == (9911, "127.0.0.2")
    assert cli._parser().parse_args(["serve", "--port", "9912"]).port == 9912  # the flag wins


@pytest.mark.parametrize("stdin", ["s3cr3t-Value", "s3cr3t-Value\n", "s3cr3t-Value\r\n"])
def test_hash_secret_prints_the_sha256_of_the_secret(stdin: str) -> None:
    done = run_cli("hash-secret", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == hashlib.sha256(b"s3cr3t-Value").hexdigest() + "\n"


def test_hash_secret_refuses_an_empty_secret() -> None:
    done = run_cli("hash-secret", stdin="")
    assert done.returncode == 1 and done.stdout == ""
    assert "empty" in done.stderr


async def test_a_hashed_secret_is_what_the_sidecar_accepts(
    make_client: ClientFactory, redis_client: redis.Redis, tmp_path: Path
) -> None:
    digest = run_cli("hash-secret", stdin="correct horse\n").stdout.strip()
    doc: dict[str, Any] = {
        "budgets": [{"id": "b", "name": "B", "scope": "organization", "limit_usd": 1,
                     "period": "daily"}],
        "auth": {"clients": [{"client_id": "agent-1", "role": "agent",
                              "secret_sha256": digest}]},
    }  # fmt: skip
    path = tmp_path / "auth.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    assert run_cli("check-config", str(path)).returncode == 0
    client = await make_client(doc)

    def basic(secret: str) -> dict[str, str]:
        token = base64.b64encode(f"agent-1:{secret}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    ok = await client.get("/v1/budgets/b/status", headers=basic("correct horse"))
    assert ok.status == 200, await ok.text()
    wrong = await client.get("/v1/budgets/b/status", headers=basic("correct horse\n"))
    assert wrong.status == 401


def test_check_config_accepts_the_example_config() -> None:
    done = run_cli("check-config", str(EXAMPLE))
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith(f"ok: {EXAMPLE}: 2 budgets, 3 rate limits, 2 prices")
    assert done.stderr == ""


def test_check_config_on_a_bad_file_answers_on_stdout_with_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("budgets:\n- {id: b, name: B, scope: galaxy, limit_usd: 1, period: daily}\n")
    done = run_cli("check-config", str(path))
    assert done.returncode == 1
    assert done.stdout == (
        f"invalid: {path}: $.budgets[0].scope: 'galaxy' is not one of: "
        "organization, team, agent, workflow, user, run\n"
    )
    assert done.stderr == ""
    usage = run_cli("check-config")  # no FILE: argparse's own usage error
    assert usage.returncode == 2


_STORE_OF = {"redis": "RedisStore", "rediss": "RedisStore", "unix": "RedisStore",
             "redis+cluster": "ClusterStore", "rediss+cluster": "ClusterStore",
             "redis+sentinel": "SentinelStore", "rediss+sentinel": "SentinelStore"}  # fmt: skip


def _concrete(form: str) -> str:
    """A URL of a documented form: placeholders filled, [optional] parts dropped."""
    url = re.sub(r"\[[^\[\]]*\]", "", re.sub(r"\[[^\[\]]*\]", "", form))
    for word, value in [("PASSWORD", "pw"), ("HOST", "127.0.0.1"), ("SENTINEL", "127.0.0.1"),
                        ("PORT", "1"), ("SERVICE", "mymaster"), ("PATH", "tmp")]:  # fmt: skip
        url = url.replace(word, value)
    return url


async def test_every_documented_redis_url_opens_its_store() -> None:
    """The forms in serve --help and deploy/kubernetes/README.md are the ones open_store
    routes to a standalone, Cluster or Sentinel store (constructed; nothing connects)."""
    help_text = run_cli("serve", "--help").stdout
    k8s = (REPO / "deploy" / "kubernetes" / "README.md").read_text()
    assert "separate issue" not in k8s
    forms = re.findall(r"\b(?:redis|rediss|unix)(?:\+\w+)?://\S+", help_text + k8s)
    forms = [f.strip("`'\",.;)") for f in forms]
    full = {f.partition("://")[0]: f for f in forms if f.partition("://")[2]}
    seen = set()
    for form in forms:
        scheme, _, rest = form.partition("://")
        if not rest:  # "(rediss+cluster:// for TLS)": the plain form's URL, that scheme
            form = scheme + "://" + full[scheme.replace("rediss", "redis")].partition("://")[2]
        opened = store.open_store(_concrete(form), timeout_ms=50)
        try:
            assert type(opened).__name__ == _STORE_OF[scheme], form
        finally:
            await opened.close()
        seen.add(scheme)
    assert seen == set(_STORE_OF), seen
