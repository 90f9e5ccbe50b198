"""Identity smuggling through the real proxies, from the shipped deploy/ files.

What each proxy passes to the check when a client repeats a header (measured with the
binaries: tests/test_attack17_identity.py's docstring has the why):
- nginx, Traefik, Caddy (2.11 and 2.6.2) and HAProxy's Lua action pass both copies as two
  header lines, names as the client spelled them (nginx, HAProxy) or canonicalised
  (Traefik, Caddy). The sidecar used to charge the first; now it is a 400 naming it.
- Envoy joins them into one value ("u1,u2"), which no identifier or strict decimal
  matches: a 400 naming it before this change too.
- The payer (x-org-id) in any spelling and any number of copies, and the trusted URI and
  method headers, never reach the check as the client sent them.

One proxy per test, one connection per request, a handful of requests each.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests import test_proxy_servers
from tests.test_proxy_servers import IDENTITY, ORG_BUDGET, USER_BUDGET, Stack, doc, org_held

make_stack, proxy_kind = test_proxy_servers.make_stack, test_proxy_servers.proxy_kind

ROUTES = [
    {"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.01}},
    {"prefix": "/v1/models", "hold": False},
    {"prefix": "/v1/acme", "defaults": {"org_id": "acme", "estimated_usd": 0.01}},
]


async def send_raw(stack: Stack, lines: list[str], path: str = "/v1/chat/completions") -> Any:
    """POST `path` through the proxy with exactly these header lines; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{stack.proxy.port}",  # Caddy's site matches on it
        "Connection: close",
        "Content-Type: application/json",
        "Content-Length: 2",
        *lines,
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n{}").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    top, _, body = answer.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), body


def identity_lines(without: str = "") -> list[str]:
    return [f"{k}: {v}" for k, v in IDENTITY.items() if k != without]


async def user_held(stack: Stack, user: str) -> Any:
    return (await stack.budget(user))["held_usd"]


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        (["X-User-ID: victim", "x-user-id: u1"], "x-user-id"),
        (
            ["x-budget-estimate-usd: 0.000001", "X-Budget-Estimate-Usd: 0.5"],
            "x-budget-estimate-usd",
        ),
    ],
)
async def test_a_repeated_identity_or_estimate_is_refused_by_every_proxy(
    make_stack: Any, proxy_kind: str, lines: list[str], field: str
) -> None:
    config = {**doc(routes=ROUTES), "budgets": [USER_BUDGET]}
    stack = await make_stack(config, proxy_kind)
    status, body = await send_raw(stack, identity_lines(without=field) + lines)
    assert status == 400, (body, stack.proxy.output()[-2000:])
    assert json.loads(body)["field"] == field
    assert stack.seen == []
    assert await user_held(stack, "victim") == 0.0
    assert await user_held(stack, "u1") == 0.0


async def test_a_repeated_payer_or_route_header_changes_nothing(
    make_stack: Any, proxy_kind: str
) -> None:
    """Two and three copies of x-org-id (any case), and two of each URI/method header a
    client could hope the sidecar reads: the call holds as its real route says, on u1,
    and no org pays."""
    config = {**doc(routes=ROUTES), "budgets": [USER_BUDGET, ORG_BUDGET]}
    stack = await make_stack(config, proxy_kind)
    spoof = [
        "X-Org-Id: acme",
        "x-org-id: acme",
        "X-ORG-ID: other",
        "X-Original-URI: /v1/acme",
        "x-original-uri: /v1/models",
        "X-Forwarded-Uri: /v1/acme",
        "x-forwarded-uri: /v1/models",
        "X-Original-Method: OPTIONS",
        "x-forwarded-method: OPTIONS",
        "X-Forwarded-Method: OPTIONS",
    ]
    for _ in range(2):
        status, body = await send_raw(stack, identity_lines() + spoof)
        assert status == 200, (body, stack.proxy.output()[-2000:])
    assert await user_held(stack, "u1") == 0.02
    assert await org_held(stack, "acme") == 0.0
    assert await org_held(stack, "other") == 0.0
    assert len(stack.seen) == 2
    assert all("x-org-id" not in s.headers for s in stack.seen)


# Estimates a client might hope a proxy or the sidecar reads as nothing, or as less.
BAD_ESTIMATES = ["NaN", "1e309", "-1", "-0", "1" * 300, "0x10", "0.5,0.5", "5e-7"]


async def test_hostile_estimates_are_refused_by_every_proxy_and_tiny_ones_hold_the_floor(
    make_stack: Any, proxy_kind: str
) -> None:
    """Through each real proxy: every spelling above is a 400 naming the header with
    nothing upstream or held; 0 and a millionth hold settings.min_estimate_usd (the
    default $0.01), never a zero-cost pass of a priced call; spaces around a value are
    the proxy's to strip."""
    config = {**doc(routes=ROUTES), "budgets": [USER_BUDGET]}
    stack = await make_stack(config, proxy_kind)
    for value in BAD_ESTIMATES:
        status, body = await send_raw(stack, [*identity_lines(), f"x-budget-estimate-usd: {value}"])
        assert status == 400, (value, body, stack.proxy.output()[-2000:])
        assert json.loads(body)["field"] == "x-budget-estimate-usd", value
    assert stack.seen == []
    assert await user_held(stack, "u1") == 0.0
    for value in ["0", "0.000001", "  0.25\t"]:
        status, body = await send_raw(stack, [*identity_lines(), f"x-budget-estimate-usd: {value}"])
        assert status == 200, (value, body)
    assert await user_held(stack, "u1") == 0.27


async def test_an_obs_folded_identity_never_charges_the_first_line(
    make_stack: Any, proxy_kind: str
) -> None:
    """`X-User-ID: victim` continued on the next line (obs-fold): nginx refuses the
    request, Envoy, Traefik, Caddy and HAProxy pass "victim u1" and the check refuses it;
    nobody is charged and nothing goes upstream."""
    config = {**doc(routes=ROUTES), "budgets": [USER_BUDGET]}
    stack = await make_stack(config, proxy_kind)
    lines = [*identity_lines(without="x-user-id"), "X-User-ID: victim", " u1"]
    status, body = await send_raw(stack, lines)
    assert status == 400, (status, body)
    if proxy_kind != "nginx":  # nginx refuses the folded line itself (its HTML 400)
        # The others join it into "victim u1", which no identifier matches.
        assert json.loads(body)["field"] == "x-user-id"
    assert stack.seen == []
    assert await user_held(stack, "victim") == 0.0
    assert await user_held(stack, "u1") == 0.0


PRICED_ROUTES = [
    {"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.05}},
    {"prefix": "/v1/models", "hold": False},
]
# The header each example's check names the original path in (Envoy: its check's path).
PATH_FIELD = {"envoy": "path", "nginx": "x-original-uri"}


async def test_an_encoded_or_dotted_path_is_checked_as_the_upstream_reads_it(
    make_stack: Any, proxy_kind: str
) -> None:
    """`/%76%31/chat/completions` holds the /v1/chat/completions route's $0.05 behind
    every proxy (it held the $0.01 default behind nginx, Caddy and HAProxy: no route
    matched the spelling). `/v1/models/../chat/completions` passed with nothing held as
    the `hold: false` /v1/models behind all but Traefik (which cleans the path itself,
    for the check and the upstream alike): now a 400 naming the path's header."""
    config = {**doc(routes=PRICED_ROUTES), "budgets": [USER_BUDGET]}
    stack = await make_stack(config, proxy_kind)
    status, body = await send_raw(stack, identity_lines(), "/%76%31/chat/completions")
    assert status == 200, body
    assert await user_held(stack, "u1") == 0.05
    status, body = await send_raw(stack, identity_lines(), "/v1/models/../chat/completions")
    if proxy_kind == "traefik":
        assert status == 200, body
        assert stack.seen[-1].path == "/v1/chat/completions"
        assert await user_held(stack, "u1") == 0.1
    else:
        assert status == 400, body
        assert json.loads(body)["field"] == PATH_FIELD.get(proxy_kind, "x-forwarded-uri")
        assert len(stack.seen) == 1
        assert await user_held(stack, "u1") == 0.05
