"""The store: the only module that talks to Redis.

Every hot-path operation is one EVALSHA (invariant 5), sent over one auto-pipelining
connection (sidecar.resp): the script calls of one event-loop tick share one write and one
round trip, each still its own atomic script. redis-py serves what is off the hot path
(readiness, later the admin routes).

Scripts are not loaded ahead of time: a NOSCRIPT reply (a fresh server, a SCRIPT FLUSH, a
failover to a replica that never saw them) loads the script and repeats that call once, so
the store heals by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.resp import ConnectionLost, PipelinedConnection
from sidecar.scripts import Script


class StoreError(Exception):
    """A store call failed. `transient` errors (timeouts, lost connections) trigger the
    fail mode; the others are bugs (a script error) and surface as 500."""

    transient = False


class StoreUnavailable(StoreError):
    transient = True


class Store(Protocol):
    """Runs one script atomically and returns its reply; raises StoreError.

    A call that times out may still be applied by Redis later: every script is safe under
    that (a hold nobody learns of is returned when its lease ends; settle and release are
    idempotent)."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    @property
    def client(self) -> aioredis.Redis:
        """redis-py, for the calls off the hot path (definitions, readiness)."""
        ...


class RedisStore:
    """A Store over one standalone Redis (unix or TCP, optionally TLS)."""

    def __init__(self, url: str, *, timeout_ms: int) -> None:
        self._timeout_s = timeout_ms / 1000
        self._hot = PipelinedConnection(url, timeout_s=self._timeout_s)
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=max(self._timeout_s, 0.2),
            socket_timeout=max(self._timeout_s, 1.0),
            # A pooled connection goes stale when Redis restarts: one immediate retry on
            # a fresh connection, no backoff (callers bound the wait themselves).
            retry=Retry(NoBackoff(), 1),
        )

    @classmethod
    def from_url(cls, url: str, *, timeout_ms: int) -> RedisStore:
        return cls(url, timeout_ms=timeout_ms)

    @property
    def client(self) -> aioredis.Redis:
        """redis-py, for calls off the hot path."""
        return self._client

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            reply = await self._hot.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                await self._hot.execute("SCRIPT", "LOAD", script.source)
                reply = await self._hot.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except ConnectionLost as exc:
            raise StoreUnavailable(str(exc)) from exc
        if isinstance(reply, hiredis.ReplyError):
            raise StoreError(f"{script.name}.lua failed: {reply}")
        return reply

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self._timeout_s, 0.2)):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._hot.close()
        await self._client.aclose()
