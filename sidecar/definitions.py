"""Definitions made through the API (rate limits, budgets, prices): stored in Redis, seen
by every replica.

A write sets the tenant's definition, adds the tenant, then bumps the version.
Every replica polls the version every half second (one GET, off the hot path) and, when
it moved, reloads the definitions and swaps them into the engine, so a change made
through any replica is enforced by all within about a second, and decisions never read
a definition from Redis (invariant 5). The writing replica swaps at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar import keys, scripts, tasks
from sidecar.config import PriceSpec, RateLimitSpec
from sidecar.engine import Engine
from sidecar.model import Budget, OnExceed, Period, Price, RateLimit, Scope, TenantDefinitions
from sidecar.money import usd_to_micro
from sidecar.store import StoreError

log = logging.getLogger("sidecar.definitions")

POLL_S = 0.5
_encode = msgspec.json.Encoder().encode


class StoredBudget(msgspec.Struct, kw_only=True):
    """A budget made through the API, as stored (validated by the route that wrote it)."""

    id: str
    name: str
    scope: Scope
    limit_usd: float
    period: Period
    on_exceed: OnExceed
    alert_thresholds: list[int]
    scope_id: str | None = None
    created_at: str
    updated_at: str
    forecast_alert: bool = False

    def to_budget(self) -> Budget:
        return Budget(
            id=self.id,
            name=self.name,
            scope=self.scope,
            scope_id=self.scope_id,
            limit_micro=usd_to_micro(self.limit_usd),
            period=self.period,
            on_exceed=self.on_exceed,
            alert_thresholds=tuple(sorted(set(self.alert_thresholds))),
            forecast_alert=self.forecast_alert,
            source="api",
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


_decode_limit = msgspec.json.Decoder(RateLimitSpec).decode
_decode_budget = msgspec.json.Decoder(StoredBudget).decode
_decode_price = msgspec.json.Decoder(PriceSpec).decode


# Replace one definition if still there (and still the value read): lua/definition_put.lua.
_PUT = scripts.standalone("definition_put")
# Store a new one unless its id exists or the tenant has the most: lua/definition_create.lua.
_CREATE = scripts.standalone("definition_create")
# What a create did: stored, refused as the id exists, refused as the tenant has the most.
Created = Literal["created", "exists", "replaced", "full"]
_CREATED: dict[int, Created] = {1: "created", 0: "exists", 2: "replaced", -1: "full"}
# How often a merge is retried when another write lands between its read and its write;
# each lost round means another write succeeded, so this bounds only a pathological storm.
MERGE_ATTEMPTS = 50


class MergeConflict(Exception):
    """A budget kept changing under a merge for MERGE_ATTEMPTS rounds."""


def _price_field(provider: str, model: str) -> str:
    return f"p:{keys.escape(provider)}/{keys.escape(model)}"


class DefinitionStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        # What the last load read, per tenant (field -> stored JSON): what a replica puts
        # back when Redis lost its state (restore).
        self.loaded: dict[str, dict[str, str]] = {}

    # The definition, the tenant and the version live in different slots (a Redis Cluster
    # refuses MULTI across them), so the writes are ordered instead: the version moves
    # last, after what it announces is in place.
    async def create_rate_limit(self, tenant: str, spec: RateLimitSpec, most: int) -> Created:
        """Store a new rate limit; nothing written if the tenant has one of that id (two
        replicas creating the same id at once cannot both succeed) or `most` of them."""
        return await self._create(tenant, "rl:", spec.id, _encode(spec), most)

    async def replace_rate_limit(self, tenant: str, spec: RateLimitSpec) -> bool:
        """Replace a stored rate limit; False (nothing written) if it is gone: a replica
        that has not yet seen a delete made elsewhere must not bring the limit back."""
        return await self._replace(tenant, f"rl:{spec.id}", _encode(spec))

    async def delete_rate_limit(self, tenant: str, limit_id: str) -> bool:
        return await self._delete(tenant, f"rl:{limit_id}")

    async def merge_budget(
        self, tenant: str, budget_id: str, change: Callable[[StoredBudget], StoredBudget]
    ) -> StoredBudget | None:
        """Apply `change` to the budget as stored in Redis and store the result; None
        (nothing written) if it is gone. The merge reads Redis, not this replica's copy,
        and writes only if nothing changed since the read (else it reads again): a replica
        that has not yet seen a re-create or another replica's update must not bring the
        old budget's fields back, nor bring a deleted budget back."""
        key, field = keys.definitions(tenant), f"b:{budget_id}"
        for _ in range(MERGE_ATTEMPTS):
            raw = await self._client.hget(key, field)
            if raw is None:
                return None
            merged = change(_decode_budget(raw))
            # One key, so one script is atomic in a Redis Cluster too.
            written = int(await self._client.eval(_PUT, 1, key, field, raw, _encode(merged)))
            if written == -1:
                return None
            if written == 1:
                await self._client.incr(keys.DEFS_VERSION)
                return merged
        raise MergeConflict(budget_id)

    async def create_budget(self, tenant: str, budget: StoredBudget, most: int) -> Created:
        """Store a new budget; nothing written if the tenant has one of that id (two
        replicas creating the same id at once cannot both succeed) or `most` of them."""
        return await self._create(tenant, "b:", budget.id, _encode(budget), most)

    async def delete_budget(self, tenant: str, budget_id: str) -> bool:
        return await self._delete(tenant, f"b:{budget_id}")

    async def put_price(self, tenant: str, spec: PriceSpec, most: int) -> Created:
        """Set a price: replaced if the tenant has set one for that provider and model,
        else stored unless the tenant has `most` of them (each is held in every replica's
        memory, like budgets and rate limits)."""
        field = _price_field(spec.provider, spec.model)
        return await self._create(tenant, "p:", field[len("p:") :], _encode(spec), most,
                                  replace=True)  # fmt: skip

    async def delete_price(self, tenant: str, provider: str, model: str) -> bool:
        return await self._delete(tenant, _price_field(provider, model))

    async def _create(
        self, tenant: str, prefix: str, def_id: str, value: bytes, most: int,
        *, replace: bool = False,
    ) -> Created:  # fmt: skip
        # One key, so one script is atomic in a Redis Cluster too.
        key = keys.definitions(tenant)
        upsert = "1" if replace else ""
        done = _CREATED[int(await self._client.eval(_CREATE, 1, key, prefix + def_id, value,
                                                    prefix, most, upsert))]  # fmt: skip
        if done in ("created", "replaced"):
            await self._client.sadd(keys.DEFS_TENANTS, tenant)
            await self._client.incr(keys.DEFS_VERSION)
        return done

    async def _replace(self, tenant: str, field: str, value: bytes) -> bool:
        # One key, so one script is atomic in a Redis Cluster too.
        replaced = int(await self._client.eval(_PUT, 1, keys.definitions(tenant), field, "", value))
        if replaced == 1:
            await self._client.incr(keys.DEFS_VERSION)
        return replaced == 1

    async def _delete(self, tenant: str, field: str) -> bool:
        """Delete one definition; False (nothing written, not even the version) if absent."""
        deleted = await self._client.hdel(keys.definitions(tenant), field)
        if deleted:
            await self._client.incr(keys.DEFS_VERSION)
        return bool(deleted)

    async def version(self) -> int:
        return int(await self._client.get(keys.DEFS_VERSION) or 0)

    async def load(self) -> dict[str, TenantDefinitions]:
        """Every tenant's API definitions. A stored definition that no longer validates
        (written by another version) is skipped and logged, not fatal."""
        out: dict[str, TenantDefinitions] = {}
        # The client decodes responses (decode_responses=True): names are str.
        tenants = [str(t) for t in await self._client.smembers(keys.DEFS_TENANTS)]
        stored: dict[str, dict[str, str]] = {}
        for tenant in sorted(tenants):
            fields = await self._client.hgetall(keys.definitions(tenant))
            stored[tenant] = {str(f): str(v) for f, v in fields.items()}
            limits: list[RateLimit] = []
            budgets: list[Budget] = []
            prices: list[Price] = []
            for field, raw in sorted((str(f), str(v)) for f, v in fields.items()):
                try:
                    if field.startswith("rl:"):
                        limits.append(_decode_limit(raw).to_rate_limit("api"))
                    elif field.startswith("b:"):
                        budgets.append(_decode_budget(raw).to_budget())
                    elif field.startswith("p:"):
                        prices.append(_decode_price(raw).to_price())
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    log.error("skipping stored definition %s of tenant %s: %s", field, tenant, exc)
            out[tenant] = TenantDefinitions(tuple(limits), tuple(budgets), tuple(prices))
        self.loaded = stored
        return out

    async def restore(self, tenants: set[str] | None = None) -> int:
        """Put back, after Redis lost its state or went back to an older one, the
        definitions the last load read (of `tenants`; None: all). One absent is written
        (another replica may have put it back, or a client made a new one since: those
        stand). One present but different is written only if it is a budget whose stored
        updated_at is older than the loaded one's: an older dump holds the budget as it
        was then (a limit lowered since would be raised again), while a newer updated_at
        is a change made since (on another replica, or after the rollback) and stands, as
        does a replica's copy that lags. Rate limits and prices carry no time: the dump's
        version stands. Returns how many this call wrote."""
        written = 0
        for tenant, fields in self.loaded.items():
            if tenants is not None and tenant not in tenants:
                continue
            key = keys.definitions(tenant)
            for field, raw in fields.items():
                if await self._client.hsetnx(key, field, raw):
                    written += 1
                    continue
                present = await self._client.hget(key, field)
                if present is not None and _older_budget(str(present), raw):
                    # Only if still the value read (lua/definition_put.lua).
                    put = await self._client.eval(_PUT, 1, key, field, str(present), raw)
                    written += int(put) == 1
            if fields:
                await self._client.sadd(keys.DEFS_TENANTS, tenant)
        await self._client.incr(keys.DEFS_VERSION)
        return written


def _older_budget(present: str, loaded: str) -> bool:
    """Whether the stored budget `present` is an older version than `loaded` (RFC 3339
    UTC strings of one form compare in time order); False for anything else."""
    if present == loaded:
        return False
    try:
        return _decode_budget(present).updated_at < _decode_budget(loaded).updated_at
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False


class DefinitionWatcher:
    """Keeps an engine's API definitions equal to Redis's, polling the version."""

    def __init__(self, store: DefinitionStore, engine: Engine) -> None:
        self.store = store
        self._engine = engine
        self._seen: int | None = None
        # Called before every reload: sidecar.state_loss checks the state markers and, if
        # a slot lost its state, puts the definitions back first, so this replica never
        # swaps in (and forgets) an emptied set. Not only when the version went backwards:
        # in a Redis Cluster one tenant's slot can be lost while the version, in another
        # slot, moves on with a write for another tenant; a load then would read the lost
        # tenant's definitions as none and leave restore nothing to put back.
        self.suspect: Callable[[], Awaitable[object]] | None = None
        # One reload at a time: the last to finish is what the engine keeps, so a reload
        # that read before an admin write (the poll's) and finished after the write's own
        # reload put the old definitions back, after the write had answered, until the
        # next poll. Serialized, a reload that starts after a write reads it.
        self._reloading = asyncio.Lock()

    async def refresh(self) -> None:
        """Check the store's state (`suspect`: always, see above), then reload (after a
        local write, or when the version moved)."""
        if self.suspect is not None:
            await self.suspect()
        await self.reload()

    async def reload(self) -> None:
        """Reload now, without the state check (what the check itself calls)."""
        async with self._reloading:
            version = await self.store.version()
            self._engine.set_definitions(await self.store.load())
            self._seen = version

    async def poll_once(self) -> None:
        version = await self.store.version()
        if version == self._seen:
            return
        await self.refresh()

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (RedisError, OSError, StoreError) as exc:
                # Keep enforcing what we have; the next poll tries again. (StoreError: the
                # loss check `suspect` runs scripts, which time out as the store's errors.)
                log.warning("cannot read definitions from redis: %s", exc)
            await asyncio.sleep(POLL_S)

    async def lifecycle(self) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self.run())
        yield
        await tasks.stop([task], what="definitions watcher")
