"""What a user's agent sees when the sidecar or its Redis fails, through the real clients:
the `axonflow` SDK (pre_check, gateway mode) and `axonflow-litellm`'s AxonFlowLogger over
`litellm` with `mock_response=` (every LLM call it makes is counted here). The sidecar is
killed (SIGKILL) between calls and while a call is in flight, or frozen (SIGSTOP); Redis is
frozen or killed with the sidecar's fail mode closed and open.

The promises: a denial is never read as an outage nor an outage as a denial (by the
exception type the client raises); fail closed makes no LLM call; fail open lets it through
and the sidecar says `degraded`; nothing waits past the client's own timeout (asserted by
outcome: every call returns or raises; the bounds below only turn a hang into a failure).
README's sections on the SDK and on LiteLLM give the table of what each client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer, SidecarProcess
from tests.llm_clients import (
    HAVE_STACK,
    LLM_CLIENT_WARNINGS,
    AxonFlow,
    AxonFlowError,
    AxonFlowLogger,
    AxonFlowLoggerConfig,
    BudgetExceededError,
    PolicyDeniedError,
    RetryConfig,
    SdkConnectionError,
    SdkTimeoutError,
    TokenUsage,
    httpx,
    litellm,
    require_stack,
)

pytestmark = LLM_CLIENT_WARNINGS

# The clients' own timeout in these tests (seconds), and the guard that turns a hang into
# a failure: generous, never a timing assertion.
CLIENT_TIMEOUT_S = 1.0
GUARD_S = 30.0
# No retries: the SDK's configured timeout is per attempt (README: with its default
# RetryConfig a frozen sidecar costs 3 timeouts plus 3 s of backoff).
NO_RETRY = None if not HAVE_STACK else RetryConfig(enabled=False)


def doc(fail_mode: str, **settings: Any) -> dict[str, Any]:
    """agent-1 has $1 to spend; agent-2 nothing (less than one pre-check's $0.01)."""
    return {
        "budgets": [{"id": "agent-cap", "name": "Agent cap", "scope": "agent",
                     "scope_id": "agent-1", "limit_usd": 1.0, "period": "daily",
                     "on_exceed": "block"},
                    {"id": "spent", "name": "Spent", "scope": "agent", "scope_id": "agent-2",
                     "limit_usd": 0.001, "period": "daily", "on_exceed": "block"}],
        "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.5,
                     "output_per_1k": 0.25}],
        "settings": {"fail_mode": fail_mode, "redis_timeout_ms": 200, **settings},
    }  # fmt: skip


@pytest.fixture
def redis_own() -> Iterator[RedisServer]:
    """A Redis of this test's own: it is frozen and killed here (never the session's)."""
    server = RedisServer().start()
    yield server
    with contextlib.suppress(ProcessLookupError, TypeError, AttributeError):
        os.kill(server.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
    server.cleanup()


@pytest.fixture
def start(
    write_config: Callable[..., Path],
) -> Iterator[Callable[..., SidecarProcess]]:
    require_stack()
    procs: list[SidecarProcess] = []

    def run(redis: RedisServer, config: dict[str, Any]) -> SidecarProcess:
        name = f"sidecar-{len(procs)}.yaml"
        proc = SidecarProcess(redis.url, str(write_config(config, name))).start()
        procs.append(proc)
        return proc

    yield run
    for p in procs:
        if p.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.process.pid, signal.SIGCONT)
        p.cleanup()


@pytest.fixture
def llm_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every litellm.acompletion the wrapper makes (it looks the function up per call)."""
    calls: list[str] = []
    real = litellm.acompletion

    async def counted(**kwargs: Any) -> Any:
        calls.append(kwargs["model"])
        return await real(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", counted)
    return calls


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def kill(proc: Any) -> None:
    """SIGKILL, and reap it (the harness's cleanup then has nothing to stop)."""
    proc.kill()
    proc.wait()


async def outcome(call: Awaitable[Any], what: str, *, also: type[BaseException] = Exception) -> Any:
    """The call's result, or the exception it raised (an Exception, or `also`); a hang
    past GUARD_S fails the test instead of hanging it."""
    try:
        return await asyncio.wait_for(call, GUARD_S)
    except (Exception, also) as exc:
        assert not isinstance(exc, asyncio.TimeoutError), f"{what} hung past the guard"
        return exc


async def sdk_pre_check(url: str, retry: Any = NO_RETRY, agent: str = "agent-1") -> Any:
    """The raw SDK's pre_check: its result or the exception it raised (never a hang)."""
    client = AxonFlow(endpoint=url, client_id="outage-test", timeout=CLIENT_TIMEOUT_S,
                      retry_config=retry)  # fmt: skip
    try:
        call = client.pre_check(user_token="", query="q", context={"agent_id": agent})
        return await outcome(call, "the SDK", also=asyncio.CancelledError)
    finally:
        await client.close()


async def sdk_audit(url: str, context_id: str) -> Any:
    """The raw SDK's audit_llm_call of `context_id`: its result or the exception."""
    client = AxonFlow(endpoint=url, client_id="outage-test", timeout=CLIENT_TIMEOUT_S,
                      retry_config=NO_RETRY)  # fmt: skip
    usage = TokenUsage(prompt_tokens=10, completion_tokens=20, total_tokens=30)
    try:
        call = client.audit_llm_call(context_id=context_id, response_summary="ok",
                                     provider="openai", model="gpt-4o", token_usage=usage,
                                     latency_ms=1)  # fmt: skip
        return await outcome(call, "the SDK")
    finally:
        await client.close()


async def governed(url: str, fail_open: bool, agent: str = "agent-1") -> Any:
    """One AxonFlowLogger completion: the response or the exception the agent sees."""
    logger = AxonFlowLogger(
        AxonFlowLoggerConfig(endpoint=url, client_id="outage-test", fail_open=fail_open,
                             call_timeout_seconds=CLIENT_TIMEOUT_S,
                             extra_context={"agent_id": agent})
    )  # fmt: skip
    try:
        call = logger.acompletion(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                  mock_response="ok")  # fmt: skip
        return await outcome(call, "the wrapper")
    finally:
        await logger.aclose()


def established(port: int) -> int:
    """Connections established to `port` on 127.0.0.1, from /proc/net/tcp (server side)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for line in lines if line.split()[1] == local and line.split()[3] == "01")


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll (without blocking the loop the calls run on) until predicate() holds."""
    for _ in range(int(GUARD_S / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {GUARD_S}s")


def is_response(x: Any) -> bool:
    return not isinstance(x, BaseException) and x.choices[0].message.content == "ok"


def outage_503(x: Any) -> bool:
    """The SDK's reading of the sidecar's fail-closed answer: a plain AxonFlowError with
    the 503, never a budget or policy denial."""
    return (
        type(x) is AxonFlowError and str(x).startswith("HTTP 503:") and "fail mode closed" in str(x)
    )


# ---- Redis fails ------------------------------------------------------------------------


def budget_denial(x: Any) -> bool:
    """The wrapper's reading of a budget's 402: a rejection, raised whatever fail_open."""
    return isinstance(x, PolicyDeniedError) and isinstance(x.__cause__, BudgetExceededError)


async def test_redis_frozen_then_killed_with_fail_mode_closed(
    redis_own: RedisServer, start: Callable[..., SidecarProcess], llm_calls: list[str]
) -> None:
    """First the control: an exhausted budget is BudgetExceededError to the SDK and a
    PolicyDeniedError to the wrapper, fail_open or not, no LLM call. Then Redis frozen,
    then killed: the sidecar answers its 503 within its own timeout, which the SDK reads as
    an outage (AxonFlowError "HTTP 503"), never a denial. AxonFlowLogger with
    fail_open=False raises that same outage and makes no LLM call; with its default,
    fail_open=True, the wrapper's own policy lets the call through (README: set
    fail_open=False to keep the sidecar's fail closed)."""
    sidecar = start(redis_own, doc("closed"))
    assert isinstance(await sdk_pre_check(sidecar.url, agent="agent-2"), BudgetExceededError)
    for fail_open in (True, False):
        denied = await governed(sidecar.url, fail_open, agent="agent-2")
        assert budget_denial(denied), repr(denied)
    assert llm_calls == []

    assert redis_own.process is not None
    freeze(redis_own.process.pid)
    assert outage_503(await sdk_pre_check(sidecar.url))
    assert outage_503(await sdk_pre_check(sidecar.url, agent="agent-2"))
    closed = await governed(sidecar.url, fail_open=False)
    assert outage_503(closed), repr(closed)
    assert llm_calls == []
    assert is_response(await governed(sidecar.url, fail_open=True))
    assert llm_calls == ["gpt-4o"]

    kill(redis_own.process)
    redis_own.process = None
    assert outage_503(await sdk_pre_check(sidecar.url))
    assert outage_503(await governed(sidecar.url, fail_open=False))
    assert llm_calls == ["gpt-4o"]


async def test_redis_frozen_then_killed_with_fail_mode_open(
    redis_own: RedisServer, start: Callable[..., SidecarProcess], llm_calls: list[str]
) -> None:
    """Fail open: the pre-check is approved, nothing held, and says degraded where the SDK
    keeps it (approved_data) as well as in the body and the X-Budget-Degraded header; the
    wrapper's call goes through whatever its own fail_open (its audit then fails quietly:
    nothing was held). Before Redis went away, a denial was still a denial."""
    sidecar = start(redis_own, doc("open"))
    healthy = await sdk_pre_check(sidecar.url)
    assert healthy.approved is True and "degraded" not in healthy.approved_data
    assert budget_denial(await governed(sidecar.url, fail_open=True, agent="agent-2"))
    assert redis_own.process is not None
    freeze(redis_own.process.pid)
    result = await sdk_pre_check(sidecar.url)
    assert not isinstance(result, BaseException), repr(result)
    assert result.approved is True and result.approved_data == {"degraded": True}
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(f"{sidecar.url}/api/policy/pre-check",
                                json={"context": {"agent_id": "agent-1"}})  # fmt: skip
    body = answer.json()
    assert answer.status_code == 200 and body["approved"] is True and body["degraded"] is True
    assert answer.headers["X-Budget-Degraded"] == "true"
    for fail_open in (True, False):
        assert is_response(await governed(sidecar.url, fail_open))
    assert llm_calls == ["gpt-4o", "gpt-4o"]

    # Redis back: the fail-open call's audit is charged (sidecar.fail_open; README).
    thaw(redis_own.process.pid)
    for _ in range(int(GUARD_S / 0.05)):  # degraded until the breaker lets a probe through
        again = await sdk_pre_check(sidecar.url)
        if not again.approved_data:
            break
        await asyncio.sleep(0.05)
    audit = await sdk_audit(sidecar.url, result.context_id)
    assert not isinstance(audit, BaseException) and audit.success is True, repr(audit)
    assert again.approved is True and again.approved_data == {}

    kill(redis_own.process)
    redis_own.process = None
    result = await sdk_pre_check(sidecar.url)
    assert result.approved is True and result.approved_data == {"degraded": True}
    assert is_response(await governed(sidecar.url, fail_open=False))
    assert len(llm_calls) == 3


# ---- the sidecar fails ------------------------------------------------------------------


async def test_the_sidecar_frozen_then_killed_between_calls(
    redis_own: RedisServer, start: Callable[..., SidecarProcess], llm_calls: list[str]
) -> None:
    """SIGSTOP on the sidecar: the SDK raises its TimeoutError (with retries too, after
    each attempt's timeout); the wrapper's call_timeout_seconds ends its pre-check: with
    fail_open=False a PolicyDeniedError "AxonFlow timed out" and no LLM call (the client
    names its own outage a denial: README), with fail_open=True the call goes through.
    Then SIGKILL: the SDK's ConnectionError; the wrapper as configured again."""
    sidecar = start(redis_own, doc("closed"))
    assert sidecar.process is not None
    freeze(sidecar.process.pid)
    assert isinstance(await sdk_pre_check(sidecar.url), SdkTimeoutError)
    retried = RetryConfig(max_attempts=2, initial_delay=0.1)
    assert isinstance(await sdk_pre_check(sidecar.url, retried), SdkTimeoutError)
    closed = await governed(sidecar.url, fail_open=False)
    assert isinstance(closed, PolicyDeniedError) and "timed out" in str(closed), repr(closed)
    assert closed.__cause__ is None  # no answer from the sidecar behind it
    assert llm_calls == []
    assert is_response(await governed(sidecar.url, fail_open=True))
    assert llm_calls == ["gpt-4o"]

    kill(sidecar.process)
    sidecar.process = None
    assert isinstance(await sdk_pre_check(sidecar.url), SdkConnectionError)
    assert isinstance(await sdk_pre_check(sidecar.url, retried), SdkConnectionError)
    closed = await governed(sidecar.url, fail_open=False)
    # Its SDK retries a refused connection (1 s, then 2 s) longer than the wrapper's call
    # timeout: the wrapper's answer is its own timeout, a PolicyDeniedError again.
    assert isinstance(closed, PolicyDeniedError) and "timed out" in str(closed), repr(closed)
    assert llm_calls == ["gpt-4o"]
    assert is_response(await governed(sidecar.url, fail_open=True))
    assert llm_calls == ["gpt-4o", "gpt-4o"]


async def test_the_sidecar_killed_with_a_call_in_flight(
    redis_own: RedisServer, start: Callable[..., SidecarProcess], llm_calls: list[str]
) -> None:
    """Redis frozen (and a redis timeout longer than the client's wait) keeps pre-checks
    inside the sidecar; SIGKILL then. The SDK lets httpx's RemoteProtocolError out, not an
    AxonFlowError (README); the wrapper with fail_open=False raises it: no LLM call."""
    sidecar = start(redis_own, doc("closed", redis_timeout_ms=20_000))
    assert redis_own.process is not None and sidecar.process is not None
    freeze(redis_own.process.pid)
    logger = AxonFlowLogger(
        AxonFlowLoggerConfig(endpoint=sidecar.url, client_id="outage-test", fail_open=False,
                             call_timeout_seconds=GUARD_S,
                             extra_context={"agent_id": "agent-1"})
    )  # fmt: skip
    in_flight = asyncio.create_task(sdk_pre_check(sidecar.url))
    wrapped = asyncio.create_task(
        logger.acompletion(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                           mock_response="ok")
    )  # fmt: skip
    # Both connections made (the sidecar accepts at once: only Redis is frozen); each
    # request is written right after its connect.
    await until(lambda: established(sidecar.port) >= 2, "both calls connected")
    await asyncio.sleep(0.2)
    kill(sidecar.process)
    sidecar.process = None
    sdk_seen = await in_flight
    wrapper_seen: BaseException | None = None
    try:
        await asyncio.wait_for(wrapped, GUARD_S)
    except Exception as exc:
        wrapper_seen = exc
    finally:
        await logger.aclose()
    assert not isinstance(wrapper_seen, asyncio.TimeoutError)
    # In flight: the connection dropped with no answer, a raw httpx transport error (the
    # SDK wraps only connect errors and timeouts: those would be its own types).
    for seen in (sdk_seen, wrapper_seen):
        assert isinstance(seen, httpx.RemoteProtocolError | httpx.ReadError), repr(seen)
    assert llm_calls == []
    thaw(redis_own.process.pid)
