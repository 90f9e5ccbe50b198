"""The store: the only module that talks to Redis.

Every hot-path operation is one EVALSHA (invariant 5). Scripts are not loaded ahead of
time: a NOSCRIPT reply (a fresh server, a SCRIPT FLUSH, a failover to a replica that never
saw them) loads the script and repeats the call once, so the store heals by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from sidecar.scripts import Script


class StoreError(Exception):
    """A store call failed. `transient` errors (timeouts, lost connections) trigger the
    fail mode; the others are bugs (a script error) and surface as 500."""

    transient = False


class StoreUnavailable(StoreError):
    transient = True


class Store(Protocol):
    """Runs one script atomically and returns its reply; raises StoreError."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class RedisStore:
    """A Store over redis-py's asyncio client (standalone Redis, unix or TCP)."""

    def __init__(self, client: aioredis.Redis, *, timeout_ms: int) -> None:
        self._client = client
        self._timeout_s = timeout_ms / 1000

    @classmethod
    def from_url(cls, url: str, *, timeout_ms: int) -> RedisStore:
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=max(timeout_ms / 1000, 0.05),
            max_connections=256,
            retry_on_timeout=False,
        )
        return cls(client, timeout_ms=timeout_ms)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    return await self._client.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    await self._client.script_load(script.source)
                    return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            raise StoreError(f"{script.name}.lua failed: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc.__class__.__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self._timeout_s, 0.2)):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._client.aclose()
