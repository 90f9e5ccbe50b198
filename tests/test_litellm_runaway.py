"""The real LiteLLM stack against a real sidecar: `litellm` (offline, `mock_response=`),
the `axonflow` SDK and `axonflow-litellm`'s AxonFlowLogger, which calls pre_check before
each completion and audit_llm_call after it. A runaway loop of 50 concurrent tasks must
end within a block budget with every completed call charged, whether the model is named
`gpt-4o` or the LiteLLM way (`openai/gpt-4o`); a request limit of 5 per minute lets at most
5 of 30 calls run; an unpriced model is charged its hold, never $0.

mock_response answers with usage of 10 prompt and 20 completion tokens (gotchas.md): the
test prices gpt-4o so that one call costs exactly $0.01, the pre-check's default hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer, SidecarProcess
from tests.llm_clients import (
    LLM_CLIENT_WARNINGS,
    AxonFlowLogger,
    AxonFlowLoggerConfig,
    litellm,
    require_stack,
)

pytestmark = LLM_CLIENT_WARNINGS

PER_CALL_USD = 0.01
TASKS = 50


def doc(budget: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": [budget] if budget else [],
        # 10 tokens in at $0.5/1k + 20 out at $0.25/1k = $0.005 + $0.005 = $0.01 a call.
        "pricing": [
            {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.5, "output_per_1k": 0.25}
        ],
        **extra,
    }


AGENT_BUDGET = {
    "id": "agent-cap",
    "name": "Agent cap",
    "scope": "agent",
    "scope_id": "agent-1",
    "limit_usd": 0.05,
    "period": "daily",
    "on_exceed": "block",
}


@pytest.fixture
def start(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> Iterator[Callable[[dict[str, Any]], SidecarProcess]]:
    require_stack()
    procs: list[SidecarProcess] = []

    def run(config: dict[str, Any]) -> SidecarProcess:
        proc = SidecarProcess(redis_server.url, str(write_config(config))).start()
        procs.append(proc)
        return proc

    yield run
    for p in procs:
        p.cleanup()


async def runaway(url: str, model: str, tasks: int) -> tuple[int, int, list[str]]:
    """`tasks` concurrent governed completions of one agent: (completed, denied, errors)."""
    logger = AxonFlowLogger(
        AxonFlowLoggerConfig(
            endpoint=url, client_id="runaway-test", extra_context={"agent_id": "agent-1"}
        )
    )
    completed = denied = 0
    errors: list[str] = []

    async def one() -> None:
        nonlocal completed, denied
        try:
            await logger.acompletion(
                model=model, messages=[{"role": "user", "content": "loop"}], mock_response="ok"
            )
            completed += 1
        except Exception as exc:  # the wrapper's denials: PolicyDeniedError
            if type(exc).__name__ == "PolicyDeniedError":
                denied += 1
            else:
                errors.append(repr(exc))

    try:
        await asyncio.gather(*(one() for _ in range(tasks)))
    finally:
        await logger.aclose()
    return completed, denied, errors


def status(url: str, budget_id: str) -> dict[str, Any]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/budgets/{budget_id}/status") as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o"])
def test_a_runaway_loop_through_litellm_ends_within_the_cap(
    start: Callable[[dict[str, Any]], SidecarProcess], model: str
) -> None:
    # The pre-check holds $0.012, more than a call costs: a call charged its hold instead
    # of its priced usage (an unresolved model name) would show.
    proc = start(doc(AGENT_BUDGET, settings={"pre_check_estimate_usd": 0.012}))
    completed, denied, errors = asyncio.run(runaway(proc.url, model, TASKS))
    assert errors == []
    assert completed + denied == TASKS
    s = status(proc.url, "agent-cap")
    # Every completed call is charged its priced usage, and the cap holds.
    assert round(s["used_usd"] * 1e6) == completed * round(PER_CALL_USD * 1e6), (s, completed)
    assert s["used_usd"] <= 0.05 and s["held_usd"] == 0.0
    # Four $0.012 holds fit $0.05 at once; then $0.01 is left, less than a hold.
    assert completed == 4


def test_a_request_limit_lets_at_most_five_of_thirty_calls_run(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    limit = {"id": "agent-rpm", "scope": "agent", "metric": "requests", "limit": 5,
             "window": "1m"}  # fmt: skip
    proc = start(doc(rate_limits=[limit]))
    completed, denied, errors = asyncio.run(runaway(proc.url, "openai/gpt-4o", 30))
    assert errors == []
    # GCRA without burst spaces 5 a minute 12 s apart: of 30 at once, one runs. What
    # matters is that the wrapper reads the denials as denials, not as an outage to fail
    # open on (before, 30 of 30 ran).
    assert 1 <= completed <= 5 and denied == 30 - completed


def test_an_unpriced_model_is_charged_its_hold_never_zero(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    proc = start(doc(AGENT_BUDGET))
    completed, denied, errors = asyncio.run(runaway(proc.url, "openai/no-such-model-x", 8))
    assert errors == []
    s = status(proc.url, "agent-cap")
    assert completed == 5 and denied == 3
    # The pre-check's hold ($0.01, settings.pre_check_estimate_usd) for each completed call.
    assert round(s["used_usd"] * 1e6) == 5 * 10_000 and s["held_usd"] == 0.0
    metrics = _get(f"{proc.url}/metrics")
    line = next(x for x in metrics.splitlines()
                if x.startswith("budget_sidecar_estimate_charges_total"))  # fmt: skip
    assert float(line.split()[-1]) == 5


def test_check_budget_answers_what_pre_check_would(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    from axonflow import AxonFlow
    from axonflow.types import BudgetCheckRequest

    budget = {**AGENT_BUDGET, "limit_usd": 0.015}
    proc = start(doc(budget))

    async def scenario() -> list[tuple[bool, bool]]:
        answers = []
        async with AxonFlow(endpoint=proc.url, client_id="check-test") as client:
            for _ in range(2):
                check = await client.check_budget(BudgetCheckRequest(agent_id="agent-1"))
                pre = await client.pre_check(
                    user_token="u", query="q", context={"agent_id": "agent-1"}
                )
                answers.append((check.allowed, pre.approved))
        return answers

    # $0.015: one $0.01 hold fits, the second does not; check_budget says so both times.
    try:
        answers = asyncio.run(scenario())
    except Exception as exc:  # the second pre-check is a 402 BudgetExceededError
        assert type(exc).__name__ == "BudgetExceededError", repr(exc)
        answers = [(True, True)]
    assert answers[0] == (True, True)

    async def second_check() -> bool:
        async with AxonFlow(endpoint=proc.url, client_id="check-test") as client:
            check = await client.check_budget(BudgetCheckRequest(agent_id="agent-1"))
            return bool(check.allowed)

    # $0.005 left: less than the pre-check's hold, so pre-check would deny; so does check.
    assert asyncio.run(second_check()) is False


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url) as r:
        text: str = r.read().decode()
    return text


def test_the_stack_is_pinned() -> None:
    require_stack()
    from importlib.metadata import version

    assert version("litellm") != "1.107.0"  # a known compromised release
    assert litellm is not None


# ---- learned estimates (issue 19) ----------------------------------------------------------

LEARNED_COST_USD = 0.015  # 10 tokens in at $0.5/1k + 20 out at $0.5/1k
LEARNED_PRICING = [
    {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.5, "output_per_1k": 0.5}
]


def learned_run(
    start: Callable[[dict[str, Any]], SidecarProcess], warm_calls: int, **settings: Any
) -> tuple[int, dict[str, Any]]:
    """`warm_calls` sequential calls of agent-1 through one sidecar with no budget, then a
    50-task runaway loop through a second sidecar (same Redis) on a fresh $0.05 block
    budget; the pre-check holds its default $0.01. (completed, the budget's status)."""
    base = {"pricing": LEARNED_PRICING, "settings": settings}
    warm = start(base)
    for _ in range(warm_calls):
        completed, denied, errors = asyncio.run(runaway(warm.url, "gpt-4o", 1))
        assert (completed, denied, errors) == (1, 0, [])
    capped = start({**base, "budgets": [AGENT_BUDGET]})
    completed, denied, errors = asyncio.run(runaway(capped.url, "gpt-4o", TASKS))
    assert errors == [] and completed + denied == TASKS
    s = status(capped.url, "agent-cap")
    assert round(s["used_usd"] * 1e6) == completed * round(LEARNED_COST_USD * 1e6), s
    assert s["held_usd"] == 0.0
    return completed, s


def test_a_learned_estimate_keeps_the_runaway_loop_within_the_cap(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """After 20 calls that cost $0.015, the pre-check holds the learned $0.015 instead of
    its $0.01 default: three holds fit $0.05, the fourth does not, and every replica
    (here a second sidecar) holds the same figure."""
    completed, s = learned_run(start, 20, estimate="learned")
    assert completed == 3 and s["used_usd"] <= 0.05, s


def test_with_fixed_estimates_the_same_loop_overshoots_as_before(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """The default (estimate: fixed): five $0.01 holds fit, five calls charge $0.075."""
    completed, s = learned_run(start, 20)
    assert completed == 5 and round(s["used_usd"] * 1e6) == 75_000, s


def test_before_the_minimum_count_the_overshoot_stays_within_the_cold_start_bound(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """Cold start (20 calls seen, estimate_min_count 25): the default holds, and the spend
    past the cap is at most N x (true cost - default), N the holds that fit the cap at once
    (floor(cap / default) = 5, fewer than the 50 tasks): the README's bound."""
    completed, s = learned_run(start, 20, estimate="learned", estimate_min_count=25)
    cap, default, cost = 50_000, 10_000, round(LEARNED_COST_USD * 1e6)
    in_flight = min(TASKS, cap // default)
    past_cap = round(s["used_usd"] * 1e6) - cap
    assert completed == 5 and past_cap == 25_000, s
    assert past_cap <= in_flight * (cost - default)


def test_a_learned_estimate_never_holds_more_than_its_ceiling(
    start: Callable[[dict[str, Any]], SidecarProcess],
) -> None:
    """Ceiling $0.012: four $0.012 holds fit $0.05, four calls charge $0.06."""
    completed, s = learned_run(start, 20, estimate="learned", estimate_ceiling_usd=0.012)
    assert completed == 4 and round(s["used_usd"] * 1e6) == 60_000, s
