"""The real LLM client stack the client tests drive, imported once: `litellm` (offline,
`mock_response=`), the `axonflow` SDK and `axonflow-litellm`'s AxonFlowLogger.

The environment is set here, before the first import of any of them (import this module
before anything that imports litellm): the SDK's telemetry off, so it talks to nothing but
the sidecar; litellm's bundled cost map instead of a download; loopback never through a
proxy. Whether the stack is installed is HAVE_STACK; a test that needs it calls
require_stack(), which fails in CI rather than skip (tests/harness.py's `missing`).
"""

from __future__ import annotations

import os

import pytest

from tests.harness import missing

os.environ["AXONFLOW_TELEMETRY"] = "off"
os.environ.pop("AXONFLOW_TRY", None)
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

try:
    import httpx
    import litellm
    from axonflow import AxonFlow
    from axonflow.exceptions import AxonFlowError, BudgetExceededError
    from axonflow.exceptions import ConnectionError as SdkConnectionError
    from axonflow.exceptions import TimeoutError as SdkTimeoutError
    from axonflow.types import RetryConfig, TokenUsage
    from axonflow_litellm import AxonFlowLogger, AxonFlowLoggerConfig, PolicyDeniedError

    HAVE_STACK = True
except ImportError:  # pragma: no cover - the dev extra installs them
    HAVE_STACK = False

__all__ = [
    "HAVE_STACK",
    "LLM_CLIENT_WARNINGS",
    "AxonFlow",
    "AxonFlowError",
    "AxonFlowLogger",
    "AxonFlowLoggerConfig",
    "BudgetExceededError",
    "PolicyDeniedError",
    "RetryConfig",
    "SdkConnectionError",
    "SdkTimeoutError",
    "TokenUsage",
    "httpx",
    "litellm",
    "require_stack",
]

# litellm and pydantic warn about their own types at import and first use; not ours.
# A test module's `pytestmark = LLM_CLIENT_WARNINGS`.
LLM_CLIENT_WARNINGS = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def require_stack() -> None:
    """Skip locally, fail in CI, when the client stack is not installed."""
    if not HAVE_STACK:
        missing("axonflow, litellm and axonflow-litellm (pip install -e '.[dev]')")
