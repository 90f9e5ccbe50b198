"""A proxy flow that charges real spend: the real Envoy running the shipped
deploy/envoy/envoy.yaml (ext_authz + the budget_settle Lua response filter), a local mock
provider answering in OpenAI's (and Anthropic's) format, and the real `openai` SDK as the
client with `base_url` pointed at Envoy. Nothing in the "application" settles: every charge
comes from the filter reading `usage` in the provider's answer.

Settles are asynchronous (the filter does not hold the response back for the sidecar), so
each test waits, boundedly, for the holds to end (held 0) and then asserts exact figures:
the priced usage of the responses the mock sent, to the micro-USD.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer
from tests.test_proxy_servers import ProxyProcess, envoy, envoy_binary

# Prices with half-micro-USD steps (2.5 and 10 micro-USD per token in, 0.375 per token of
# claude's input): odd token counts make every call round, so "exact" is tested.
GPT = {"provider": "openai", "model": "gpt-4o", "input_per_1k": "0.0025", "output_per_1k": "0.01"}
CLAUDE = {
    "provider": "anthropic",
    "model": "claude-haiku",
    "input_per_1k": "0.000375",
    "output_per_1k": "0.00125",
}
ESTIMATE_USD = 0.01
# Every answer quotes a usage object in its text: the filter must not read it.
CONTENT = 'As JSON: {"usage": {"prompt_tokens": 999999, "completion_tokens": 1}}'
USER = "u1"


def doc(limit_usd: float = 1.0) -> dict[str, Any]:
    return {
        "budgets": [
            {
                "id": "user-daily",
                "name": "Each user daily",
                "scope": "user",
                "limit_usd": limit_usd,
                "period": "daily",
                "on_exceed": "block",
            }
        ],
        "pricing": [
            # The config file's numbers; cost() below reads the same prices exactly.
            {
                **p,
                "input_per_1k": float(p["input_per_1k"]),
                "output_per_1k": float(p["output_per_1k"]),
            }
            for p in (GPT, CLAUDE)
        ],
        # The OpenAI SDK sends no x-model: the route says which model (and so which price)
        # a hold is for. The client names only who pays (x-user-id).
        "proxy": {
            "routes": [
                {
                    "prefix": "/v1/chat/completions",
                    "defaults": {
                        "provider": "openai",
                        "model": "gpt-4o",
                        "estimated_usd": ESTIMATE_USD,
                    },
                },
                {
                    "prefix": "/v1/messages",
                    "defaults": {
                        "provider": "anthropic",
                        "model": "claude-haiku",
                        "estimated_usd": ESTIMATE_USD,
                    },
                },
            ]
        },
    }


def micro(tokens: int, usd_per_1k: str) -> int:
    """The cost of `tokens` at a price, rounded up to a micro-USD (as sidecar/money.py
    cost_micro does), computed here independently with exact fractions."""
    return math.ceil(Fraction(tokens) * Fraction(usd_per_1k) / 1000 * 1_000_000)


def cost(price: dict[str, Any], tokens_in: int, tokens_out: int) -> int:
    return micro(tokens_in, price["input_per_1k"]) + micro(tokens_out, price["output_per_1k"])


# ---- the mock provider ----------------------------------------------------------------


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class Provider:
    """Answers like OpenAI (/v1/chat/completions) or Anthropic (/v1/messages), with token
    counts that differ on every call (odd prompt counts, so each price rounds)."""

    calls: list[Call] = field(default_factory=list)

    @staticmethod
    def tokens_at(n: int) -> tuple[int, int]:
        """(prompt, completion) tokens of the n-th call (from 0)."""
        return 101 + 14 * n, 37 + 9 * n

    def tokens(self) -> tuple[int, int]:
        # Called after the call is recorded: the n-th call counts len - 1.
        return self.tokens_at(len(self.calls) - 1)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await request.json()
        status = int(headers.get("x-mock-status", "200"))
        call = Call(request.path, headers, body, status)
        self.calls.append(call)
        if status != 200:
            return web.json_response(
                {"error": {"message": "mock failure", "type": "server_error"}}, status=status
            )
        call.tokens_in, call.tokens_out = self.tokens()
        usage = {
            "prompt_tokens": call.tokens_in,
            "completion_tokens": call.tokens_out,
            "total_tokens": call.tokens_in + call.tokens_out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        content = CONTENT
        base = {
            "id": f"chatcmpl-{len(self.calls)}",
            "created": 1_773_144_000,
            "model": body["model"],
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": usage,
                }
            )
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        events = [
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                **({"usage": None} if include else {}),
            }
            for word in re.findall(r"\S+\s*", content)
        ]
        if include:
            events.append(
                {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        else:
            call.tokens_in = call.tokens_out = 0  # nothing reported: nothing known
        return await self._sse(
            request, [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API: input_tokens leaves out the cached input, which comes
        in cache_creation_input_tokens / cache_read_input_tokens. Its stream here ends
        lines in CRLF, which SSE allows."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await request.json()
        call = Call(request.path, headers, body, 200)
        self.calls.append(call)
        fresh, out = self.tokens()
        created, read = 3, 5
        call.tokens_in, call.tokens_out = fresh + created + read, out
        usage = {
            "input_tokens": fresh,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
            "output_tokens": out,
            "cache_creation": {
                "ephemeral_5m_input_tokens": created,
                "ephemeral_1h_input_tokens": 0,
            },
        }
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "stop_reason": "end_turn",
        }
        if not body.get("stream"):
            return web.json_response(
                {**message, "content": [{"type": "text", "text": "hi"}], "usage": usage}
            )
        start_usage = {**usage, "output_tokens": 1}
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "usage": start_usage},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "hi"},
                },
            ),
            # The running output total: the last one is the call's.
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": None},
                    "usage": {"output_tokens": out // 2},
                },
            ),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": out},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await self._sse(
            request, [f"event: {name}\r\ndata: {json.dumps(e)}\r\n\r\n" for name, e in events]
        )

    async def _sse(self, request: web.Request, events: list[str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            raw = event.encode()
            # Each event in two writes: a chunk boundary inside an event (the usage one
            # included) is what the filter must put together again.
            for part in (raw[: len(raw) // 2], raw[len(raw) // 2 :]):
                await resp.write(part)
                await asyncio.sleep(0.001)
        # The response's own end comes late: a client that closes once it has read the
        # last event (the OpenAI SDK does, at `[DONE]`) is gone before it, and Envoy resets
        # the stream. The filter must have settled by then.
        await asyncio.sleep(0.3)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


# ---- the stack --------------------------------------------------------------------------


@dataclass
class Stack:
    proxy: ProxyProcess
    sidecar: TestClient[Any, Any]
    provider: Provider
    mock: TestServer

    def sdk(self, max_retries: int) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.proxy.url + "/v1",
            api_key="sk-test",
            # Explicit: the SDK's default is 2, and the denial cost below depends on it.
            max_retries=max_retries,
            default_headers={"x-user-id": USER},
        )

    async def status(self) -> dict[str, Any]:
        resp = await self.sidecar.get("/v1/budgets/user-daily/status", params={"scope_id": USER})
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body

    async def settled(self) -> dict[str, Any]:
        """The budget's status once no hold is left (the async settles have landed)."""
        for _ in range(500):  # at most ~10 s
            state = await self.status()
            if state["held_usd"] == 0:
                return state
            await asyncio.sleep(0.02)
        raise AssertionError(f"holds still in place: {state}")

    async def counter(self, name: str, **labels: str) -> float:
        resp = await self.sidecar.get("/metrics")
        text = await resp.text()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[StackFactory]:
    envoy_binary()  # skip (or fail in CI) before anything starts when Envoy is absent
    procs: list[ProxyProcess] = []
    servers: list[TestServer] = []
    clients: list[TestClient[Any, Any]] = []
    dirs: list[Path] = []

    async def make(config: dict[str, Any]) -> Stack:
        # The in-process sidecar (as conftest's make_client builds it) with its metrics, so
        # the tests can count checks, settles and releases.
        store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
        app = create_app(make_config(config), store, clock=clock, events=Metrics(clock=clock))
        sidecar = TestClient(TestServer(app, host="127.0.0.1"))
        await sidecar.start_server()
        clients.append(sidecar)
        provider = Provider()
        mock = web.Application()
        mock.router.add_post("/v1/chat/completions", provider.chat)
        mock.router.add_post("/v1/messages", provider.messages)
        server = TestServer(mock, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        workdir = Path(tempfile.mkdtemp(prefix="bs-envoy-settle-"))
        dirs.append(workdir)
        assert sidecar.server.port is not None and server.port is not None
        proc = envoy(workdir, sidecar.server.port, server.port, fail_open=False)
        procs.append(proc)
        return Stack(proc, sidecar, provider, server)

    yield make
    for p in procs:
        p.stop()
    for s in servers:
        await s.close()
    for c in clients:
        await c.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def ask(max_tokens: int = 64) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
    }


# ---- the tests --------------------------------------------------------------------------


async def test_n_sdk_calls_charge_their_priced_usage_to_the_micro_usd(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(doc())
    client = stack.sdk(max_retries=0)
    answers = [await client.chat.completions.create(**ask()) for _ in range(6)]
    await client.close()
    state = await stack.settled()
    calls = stack.provider.calls
    assert len(calls) == 6
    # The SDK saw the mock's usage; the filter charged exactly that, not the quoted text.
    assert [(a.usage.prompt_tokens, a.usage.completion_tokens) for a in answers if a.usage] == [
        (c.tokens_in, c.tokens_out) for c in calls
    ]
    expected = sum(cost(GPT, c.tokens_in, c.tokens_out) for c in calls)
    assert state["used_usd"] == expected / 1_000_000
    assert state["held_usd"] == 0.0
    assert await stack.counter("budget_sidecar_reservations_total", event="settled") == 6
    assert await stack.counter("budget_sidecar_reservations_total", event="released") == 0
    # Every call reached the provider with a reservation id of its own.
    assert len({c.headers["x-budget-reservation-id"] for c in calls}) == 6


async def test_an_x_model_header_picks_the_price_the_tokens_are_charged_at(
    make_stack: StackFactory,
) -> None:
    """The settle carries tokens only: the sidecar prices them by the reservation's model,
    here the client's x-model over the route's default (gpt-4o)."""
    stack = await make_stack(doc())
    client = stack.sdk(max_retries=0)
    claude = {"x-provider": "anthropic", "x-model": "claude-haiku"}
    await client.chat.completions.create(**ask(), extra_headers=claude)
    await client.close()
    [call] = stack.provider.calls
    state = await stack.settled()
    assert cost(CLAUDE, *_tokens(call)) != cost(GPT, *_tokens(call))
    assert state["used_usd"] == cost(CLAUDE, *_tokens(call)) / 1_000_000


async def test_a_streamed_call_is_charged_from_its_final_usage_chunk(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(doc())
    client = stack.sdk(max_retries=0)
    stream = await client.chat.completions.create(
        **ask(), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    # The stream reached the client whole, chunk by chunk, final usage chunk included.
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CONTENT
    [call] = stack.provider.calls
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        call.tokens_in,
        call.tokens_out,
    )
    state = await stack.settled()
    assert state["used_usd"] == cost(GPT, call.tokens_in, call.tokens_out) / 1_000_000


async def test_a_stream_without_usage_leaves_its_hold_to_the_unsettled_rule(
    make_stack: StackFactory,
) -> None:
    """No usage on a 2xx: the call ran (and was billed), so the hold is neither released
    (that would make streaming without include_usage free) nor settled at a guess."""
    stack = await make_stack(doc())
    client = stack.sdk(max_retries=0)
    chunks = [c async for c in await client.chat.completions.create(**ask(), stream=True)]
    assert chunks and all(c.usage is None for c in chunks)
    # A call with usage after it: once its settle has landed, the stream's would have too.
    answer = await client.chat.completions.create(**ask())
    await client.close()
    assert answer.usage is not None
    charged = cost(GPT, answer.usage.prompt_tokens, answer.usage.completion_tokens)
    for _ in range(500):
        state = await stack.status()
        if state["used_usd"] != 0:
            break
        await asyncio.sleep(0.02)
    assert (state["used_usd"], state["held_usd"]) == (charged / 1_000_000, ESTIMATE_USD)
    assert await stack.counter("budget_sidecar_reservations_total", event="released") == 0


async def test_anthropic_style_json_and_stream_are_charged_with_cached_input(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(doc())
    body = {
        "model": "claude-haiku",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            async with session.post(
                stack.proxy.url + "/v1/messages",
                json={**body, "stream": stream},
                headers={"x-user-id": USER},
            ) as resp:
                assert resp.status == 200
                raw = await resp.read()
                assert (b"event: message_stop" in raw) == stream
    state = await stack.settled()
    calls = stack.provider.calls
    assert len(calls) == 2
    expected = sum(cost(CLAUDE, c.tokens_in, c.tokens_out) for c in calls)
    assert state["used_usd"] == expected / 1_000_000
    assert await stack.counter("budget_sidecar_reservations_total", event="settled") == 2


async def test_an_upstream_500_releases_every_hold(make_stack: StackFactory) -> None:
    stack = await make_stack(doc())
    # The SDK retries a 5xx by itself: each try is a new request, a new hold, a release.
    client = stack.sdk(max_retries=2)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**ask(), extra_headers={"x-mock-status": "500"})
    await client.close()
    assert [c.status for c in stack.provider.calls] == [500, 500, 500]
    state = await stack.settled()
    assert (state["used_usd"], state["held_usd"]) == (0.0, 0.0)
    assert await stack.counter("budget_sidecar_reservations_total", event="held") == 3
    assert await stack.counter("budget_sidecar_reservations_total", event="released") == 3
    assert await stack.counter("budget_sidecar_reservations_total", event="settled") == 0


async def test_envoy_s_own_503_for_an_unreachable_provider_releases_the_hold(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(doc())
    await stack.mock.close()  # the provider is gone: Envoy answers 503 itself
    client = stack.sdk(max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(**ask())
    await client.close()
    assert err.value.status_code == 503
    state = await stack.settled()
    assert (state["used_usd"], state["held_usd"]) == (0.0, 0.0)
    assert await stack.counter("budget_sidecar_reservations_total", event="released") == 1


async def test_client_sent_budget_headers_do_not_reach_the_upstream_or_settle(
    make_stack: StackFactory,
) -> None:
    """A client names another hold's reservation id, and fakes the sidecar's answers: the
    guard drops them, so the upstream sees only the sidecar's, and this call's usage
    settles this call's hold, not the named one."""
    stack = await make_stack(doc())
    resp = await stack.sidecar.post(
        "/v1/authorize",
        json={"user_id": USER, "provider": "openai", "model": "gpt-4o", "estimated_usd": 0.2},
    )
    victim = (await resp.json())["reservation_id"]
    client = stack.sdk(max_retries=0)
    spoof = {
        "x-budget-reservation-id": victim,
        "x-budget-degraded": "true",
        "x-budget-downgrade-model": "gpt-4o-mini",
        "x-request-id": "client-chosen",
        "x-org-id": "acme",  # who pays is not the client's to say
        # Read by the check (it is the client's to set), then kept from the upstream.
        "x-budget-estimate-usd": "0.02",
    }
    await client.chat.completions.create(**ask(), extra_headers=spoof)
    await client.chat.completions.create(**ask(), extra_headers=spoof)
    await client.close()
    calls = stack.provider.calls
    assert len(calls) == 2
    for call in calls:
        assert call.headers["x-budget-reservation-id"] != victim
        assert "x-budget-degraded" not in call.headers
        assert "x-budget-downgrade-model" not in call.headers
        assert "x-budget-estimate-usd" not in call.headers
        assert "x-org-id" not in call.headers
        # Envoy's own request id: the client's cannot pin or replay a decision.
        assert call.headers["x-request-id"] != "client-chosen"
    assert (
        calls[0].headers["x-budget-reservation-id"] != calls[1].headers["x-budget-reservation-id"]
    )
    for _ in range(500):
        state = await stack.status()
        if state["held_usd"] == 0.2:
            break
        await asyncio.sleep(0.02)
    # The victim's hold stands untouched; only the two calls were charged.
    expected = sum(cost(GPT, c.tokens_in, c.tokens_out) for c in calls)
    assert (state["held_usd"], state["used_usd"]) == (0.2, expected / 1_000_000)
    # The client's x-org-id never reached the sidecar either: the default org paid.
    records = await (await stack.sidecar.get("/api/v1/usage/records")).json()
    assert {r["org_id"] for r in records["records"]} == {"default"}, records


async def test_a_runaway_sdk_loop_stops_at_the_cap(
    make_stack: StackFactory, clock: FakeClock
) -> None:
    """A loop calling the SDK until it fails, against a block budget of $0.02 (holds of
    $0.01, real costs of about $0.0007): it stops at the cap, what it spent is charged to
    the micro-USD, and never more than the cap.

    What a denial costs the SDK: a 429 whose Retry-After is over 120 s (a daily budget's
    is the rest of the day) is not retried by openai (2.54, as 3.x): one check. Near the end
    (Retry-After <= 120 s) it sleeps Retry-After and tries again up to max_retries times:
    1 + max_retries checks, none of which reaches the provider."""
    limit = 0.02
    stack = await make_stack(doc(limit_usd=limit))
    client = stack.sdk(max_retries=2)
    used = 0
    allowed = 0
    for _ in range(200):  # bounded: a loop that does not stop fails below
        try:
            await client.chat.completions.create(**ask())
        except openai.RateLimitError as err:
            denial = err
            break
        allowed += 1
        # One call at a time, each settle landed before the next check: the count is exact.
        state = await stack.settled()
        used += cost(GPT, *_tokens(stack.provider.calls[-1]))
        assert state["used_usd"] == used / 1_000_000
    else:
        raise AssertionError("the loop never stopped")
    # It stopped at the first call whose hold did not fit beside what was spent.
    expected_allowed = 0
    spent = 0
    while spent + ESTIMATE_USD * 1_000_000 <= limit * 1_000_000:
        spent += cost(GPT, *Provider.tokens_at(expected_allowed))
        expected_allowed += 1
    assert allowed == expected_allowed
    assert len(stack.provider.calls) == allowed  # the denied call never reached it
    assert denial.response.headers["retry-after"] == "43200"
    assert isinstance(denial.body, dict)
    assert denial.body["budget_info"]["budget_id"] == "user-daily"
    denied = {"operation": "authorize", "outcome": "denied"}
    assert await stack.counter("budget_sidecar_decisions_total", **denied) == 1
    state = await stack.settled()
    assert state["used_usd"] == used / 1_000_000 <= limit

    # One second before the day ends, Retry-After is 1: the SDK sleeps and retries.
    clock.advance(12 * 3600 * 1000 - 1000)
    with pytest.raises(openai.RateLimitError) as again:
        await client.chat.completions.create(**ask())
    await client.close()
    assert again.value.response.headers["retry-after"] == "1"
    assert await stack.counter("budget_sidecar_decisions_total", **denied) == 1 + (1 + 2)
    assert len(stack.provider.calls) == allowed


def _tokens(call: Call) -> tuple[int, int]:
    return call.tokens_in, call.tokens_out
