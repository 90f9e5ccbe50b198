"""A small client for the native API, async (aiohttp) and sync (http.client), keep-alive.

    async with SidecarClient("http://127.0.0.1:8787") as sc:
        async with sc.reserve(agent_id="a1", model="gpt-4o", provider="openai",
                              estimated_tokens_in=800, estimated_tokens_out=400) as r:
            reply = await call_the_model(r.decision.downgrade_model or "gpt-4o")
            r.usage(tokens_in=reply.usage.prompt_tokens, tokens_out=reply.usage.completion_tokens)
        # settled on success; released if the block raised

A denial raises BudgetDenied (carrying the decision) from `reserve`; `authorize` returns it.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp


class SidecarError(Exception):
    """A non-200 answer: `status` and the problem+json body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('detail', body)}")
        self.status = status
        self.body = body


class BudgetDenied(Exception):
    def __init__(self, decision: dict[str, Any]) -> None:
        super().__init__(decision.get("message") or "denied by budget")
        self.decision = decision


class Reservation:
    """What `reserve` yields: the decision, and where to put the actual usage."""

    def __init__(self, decision: dict[str, Any]) -> None:
        self.decision = decision
        self.id: str = decision["reservation_id"]
        self.settlement: dict[str, Any] | None = None
        self._usage: dict[str, Any] | None = None

    def usage(
        self,
        *,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """The actual usage to settle with when the block ends without an error."""
        self._usage = {"tokens_in": tokens_in, "tokens_out": tokens_out, "cost_usd": cost_usd}


def _error_body(raw: bytes) -> dict[str, Any]:
    """The problem+json of an error answer, or its text when it is not JSON (a proxy's or
    the HTTP layer's own answer)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return {"detail": raw.decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {"detail": body}


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class SidecarClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8787", *, timeout_s: float = 5.0) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.request(method, self._base + path, json=body) as resp:
            # 202: the settle of a fail-open grant, queued until Redis answers.
            if resp.status not in (200, 202):
                raise SidecarError(resp.status, _error_body(await resp.read()))
            return await resp.json(content_type=None)

    async def authorize(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/v1/authorize", _clean(fields))
        return result

    async def check(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/v1/check", _clean(fields))
        return result

    async def settle(self, reservation_id: str, **usage: Any) -> dict[str, Any]:
        body = _clean({"reservation_id": reservation_id, **usage})
        result: dict[str, Any] = await self._call("POST", "/v1/settle", body)
        return result

    async def release(self, reservation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/release", {"reservation_id": reservation_id}
        )
        return result

    async def record(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/v1/record", _clean(fields))
        return result

    async def status(self, budget_id: str, scope_id: str | None = None) -> dict[str, Any]:
        path = f"/v1/budgets/{urllib.parse.quote(budget_id, safe='')}/status"
        if scope_id is not None:
            path += "?" + urllib.parse.urlencode({"scope_id": scope_id})
        result: dict[str, Any] = await self._call("GET", path)
        return result

    @asynccontextmanager
    async def reserve(self, **fields: Any) -> AsyncIterator[Reservation]:
        """Authorize; settle with the recorded usage on success, release on error.

        A block that records no usage settles at the estimate (the cautious charge).
        """
        decision = await self.authorize(**fields)
        if not decision["allowed"]:
            raise BudgetDenied(decision)
        if decision.get("reservation_id") is None:  # fail-open past its cap: nothing to settle
            yield Reservation({**decision, "reservation_id": ""})
            return
        reservation = Reservation(decision)
        try:
            yield reservation
        except BaseException:
            await self.release(reservation.id)
            raise
        usage = reservation._usage or {"cost_usd": decision["estimated_usd"]}
        reservation.settlement = await self.settle(reservation.id, **usage)


class SyncSidecarClient:
    """The same calls, blocking, over one kept-alive http.client connection."""

    def __init__(self, base_url: str = "http://127.0.0.1:8787", *, timeout_s: float = 5.0) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 80
        self._prefix = parsed.path.rstrip("/")
        self._timeout = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> SyncSidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
            try:
                self._conn.request(method, self._prefix + path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt == 2:
                    raise
        if resp.status not in (200, 202):  # 202: a fail-open grant's queued settle
            raise SidecarError(resp.status, _error_body(raw))
        return json.loads(raw or b"null")

    def authorize(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/authorize", _clean(fields))
        return result

    def check(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/check", _clean(fields))
        return result

    def settle(self, reservation_id: str, **usage: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/v1/settle", _clean({"reservation_id": reservation_id, **usage})
        )
        return result

    def release(self, reservation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/v1/release", {"reservation_id": reservation_id}
        )
        return result

    def record(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/record", _clean(fields))
        return result

    def status(self, budget_id: str, scope_id: str | None = None) -> dict[str, Any]:
        path = f"/v1/budgets/{urllib.parse.quote(budget_id, safe='')}/status"
        if scope_id is not None:
            path += "?" + urllib.parse.urlencode({"scope_id": scope_id})
        result: dict[str, Any] = self._call("GET", path)
        return result
