"""The README's "Using the AxonFlow SDK" example runs as written (only the port differs)
against a real sidecar in open mode with no config file, as `make run` starts it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import RedisServer, SidecarProcess, missing

REPO = Path(__file__).resolve().parent.parent


def sdk_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using the AxonFlow SDK", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one Python example"
    return str(blocks[0])


@pytest.fixture
def sidecar(redis_server: RedisServer, redis_client: object) -> Iterator[SidecarProcess]:
    try:
        import axonflow  # noqa: F401
    except ImportError:  # pragma: no cover - the dev extra installs it
        missing("the axonflow SDK (pip install -e '.[dev]')")
    proc = SidecarProcess(redis_server.url, None).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def run_example(code: str) -> str:
    env = {**os.environ, "AXONFLOW_TELEMETRY": "off", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("AXONFLOW_TRY", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_sdk_example_runs_as_written(sidecar: SidecarProcess) -> None:
    code = sdk_example()
    assert 'URL = "http://127.0.0.1:8787"' in code
    code = code.replace("http://127.0.0.1:8787", sidecar.url)
    # $0.01 held per pre-check, $0.0075 charged per audit (1000 + 500 tokens of gpt-4o):
    # two calls fit in $0.02, the third would pass it.
    assert run_example(code).splitlines() == [
        "stopped: Estimate $0.01 exceeds the $0.005 left on 'Team A' - requests blocked "
        "0.015 of 0.02",
        "used: 0.015",
        "alerts: [50]",
        "today: 0.015",
        "by workflow: [('triage', 0.015)]",
    ]
    # Run again (the budget is deleted and re-created; its period's spend stays): the
    # loop is stopped at once and nothing more is charged.
    assert run_example(code).splitlines()[:2] == [
        "stopped: Estimate $0.01 exceeds the $0.005 left on 'Team A' - requests blocked "
        "0.015 of 0.02",
        "used: 0.015",
    ]
