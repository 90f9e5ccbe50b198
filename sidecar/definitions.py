"""Definitions made through the admin API: stored in Redis, seen by every replica.

A write sets the tenant's definition, adds the tenant, then bumps the version.
Every replica polls the version every half second (one GET, off the hot path) and, when
it moved, reloads the definitions and swaps them into the engine, so a change made
through any replica is enforced by all within about a second, and decisions never read
a definition from Redis (invariant 5). The writing replica swaps at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar import keys
from sidecar.config import RateLimitSpec
from sidecar.engine import Engine
from sidecar.model import RateLimit

log = logging.getLogger("sidecar.definitions")

POLL_S = 0.5
_encode = msgspec.json.Encoder().encode
_decode_limit = msgspec.json.Decoder(RateLimitSpec).decode


class DefinitionStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    # The definition, the tenant and the version live in different slots (a Redis Cluster
    # refuses MULTI across them), so the writes are ordered instead: the version moves
    # last, after what it announces is in place.
    async def put_rate_limit(self, tenant: str, spec: RateLimitSpec) -> None:
        await self._client.hset(keys.definitions(tenant), f"rl:{spec.id}", _encode(spec))
        await self._client.sadd(keys.DEFS_TENANTS, tenant)
        await self._client.incr(keys.DEFS_VERSION)

    async def delete_rate_limit(self, tenant: str, limit_id: str) -> bool:
        deleted = await self._client.hdel(keys.definitions(tenant), f"rl:{limit_id}")
        await self._client.incr(keys.DEFS_VERSION)
        return bool(deleted)

    async def version(self) -> int:
        return int(await self._client.get(keys.DEFS_VERSION) or 0)

    async def load(self) -> dict[str, tuple[RateLimit, ...]]:
        """Every tenant's API-defined rate limits. A stored definition that no longer
        validates (written by another version) is skipped and logged, not fatal."""
        out: dict[str, tuple[RateLimit, ...]] = {}
        # The client decodes responses (decode_responses=True): names are str.
        tenants = [str(t) for t in await self._client.smembers(keys.DEFS_TENANTS)]
        for tenant in sorted(tenants):
            fields = await self._client.hgetall(keys.definitions(tenant))
            limits = []
            for field, raw in sorted((str(f), str(v)) for f, v in fields.items()):
                if not field.startswith("rl:"):
                    continue
                try:
                    limits.append(_decode_limit(raw).to_rate_limit("api"))
                except msgspec.ValidationError as exc:
                    log.error("skipping stored rate limit %s of tenant %s: %s", field, tenant, exc)
            out[tenant] = tuple(limits)
        return out


class DefinitionWatcher:
    """Keeps an engine's API definitions equal to Redis's, polling the version."""

    def __init__(self, store: DefinitionStore, engine: Engine) -> None:
        self.store = store
        self._engine = engine
        self._seen: int | None = None

    async def refresh(self) -> None:
        """Reload now (after a local write, or when the version moved)."""
        version = await self.store.version()
        self._engine.set_api_limits(await self.store.load())
        self._seen = version

    async def poll_once(self) -> None:
        if await self.store.version() != self._seen:
            await self.refresh()

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (RedisError, OSError) as exc:
                # Keep enforcing what we have; the next poll tries again.
                log.warning("cannot read definitions from redis: %s", exc)
            await asyncio.sleep(POLL_S)

    async def lifecycle(self) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self.run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
