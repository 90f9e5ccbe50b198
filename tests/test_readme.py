"""README's examples run as written against a real sidecar in open mode with no config
file, as `make run` starts it (only the port, and `.venv/bin/...` for this interpreter,
differ): every shell block in order in one shell, as a reader pastes them into one
terminal, then every Python block. A block is skipped only when an HTML comment
`<!-- needs: ... -->` right before it names what it needs. The front page stays short, and
the AxonFlow SDK example prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
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


FENCE = re.compile(r"(<!-- needs: [^>]*-->\n)?^ *```(\w*)\n(.*?)^ *```", re.S | re.M)


def blocks() -> list[tuple[str, str, bool]]:
    """(language, code, needs something external) of every fenced block, in order."""
    readme = (REPO / "README.md").read_text()
    found = FENCE.findall(readme)
    return [(lang, textwrap.dedent(code), bool(needs)) for needs, lang, code in found]


def localize(code: str, sidecar: SidecarProcess) -> str:
    for old in ("http://127.0.0.1:8787", "http://localhost:8787", "localhost:8787"):
        code = code.replace(old, sidecar.url)
    code = code.replace(".venv/bin/budget-sidecar", "\0 -m sidecar")
    return code.replace(".venv/bin/python", "\0").replace("\0", sys.executable)


def test_the_front_page_is_short_and_every_block_says_its_language() -> None:
    readme = (REPO / "README.md").read_text()
    front = readme.split("\n## How it works\n", 1)[0]
    assert len(front.splitlines()) <= 150
    assert "invariant 5" not in readme and "sitting" not in readme
    found = blocks()
    assert all(lang for lang, _, _ in found), "a block without a language hides from the test"
    runnable = [(lang, needs) for lang, _, needs in found if lang in ("sh", "python")]
    assert sum(1 for lang, needs in runnable if lang == "sh" and not needs) >= 5
    assert sum(1 for lang, needs in runnable if lang == "python" and not needs) >= 2


def test_every_shell_and_python_block_runs(sidecar: SidecarProcess) -> None:
    found = blocks()
    shell = [localize(code, sidecar) for lang, code, needs in found if lang == "sh" and not needs]
    script = "set -euo pipefail\n" + "".join(
        f"echo '--- block {i}'\n{code}\n" for i, code in enumerate(shell)
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    # What the quickstart says it shows, it shows.
    readme = (REPO / "README.md").read_text()
    denial = re.search(r'`("message":"Estimate \$9\.00 [^`]*")`', readme)
    assert denial is not None and denial.group(1) in out, out
    assert '"allowed":false' in out and '"used_usd":0.00443' in out, out
    assert "ok: deploy/budget-sidecar.example.yaml" in out
    for lang, code, needs in found:
        if lang == "python" and not needs:
            run_example(localize(code, sidecar))


def run_example(code: str) -> str:
    env = {**os.environ, "AXONFLOW_TELEMETRY": "off", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("AXONFLOW_TRY", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
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
