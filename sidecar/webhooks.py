"""Delivery of threshold alerts (sidecar.alerts) to the configured webhooks.

How an alert travels: the charging script appends it to the tenant's alerts stream
(`bs:{T}:alerts`) in the same atomic call that crossed the threshold; nothing on the
decision path waits for a webhook. Every sidecar replica runs one WebhookDeliverer, which
polls that stream through one Redis consumer group per webhook (`webhook:<name>`, one
consumer per process, `<hostname>-<pid>`), so each alert goes to one replica per webhook.

What a receiver gets: a JSON POST whose body is the alert (the AxonFlow BudgetAlert shape
plus `entity` and `tenant_id`), with the headers
    Content-Type: application/json
    X-Budget-Alert-Id: <alert id, the body's `id`, stable across retries and replicas>
    X-Budget-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the secret>
    X-Budget-Delivery: <attempt number at the replica delivering it, 1 first>
A 2xx answer acknowledges the alert (XACK); anything else (another status, a redirect, a
connection error, the webhook's timeout) is retried with exponential backoff (0.5 s
doubling to 60 s, with jitter) until a 2xx, for as long as the webhook stays configured.

Guarantees: at least once, not exactly once. A replica that dies leaves its alerts
pending in the group; after CLAIM_IDLE_MS another replica claims them (XAUTOCLAIM) and
delivers them again, and a 2xx whose XACK was lost is delivered again too. Receivers
deduplicate on X-Budget-Alert-Id (equivalently the body's `id`). A newly configured
webhook receives the alerts still in the stream (it is capped, see lua/_lib.lua), not
only the ones raised after it was added. Alerts trimmed from the stream before anyone
delivered them are dropped: logged as an error and counted (on_dropped), once over all
replicas (lua/alert_drops.lua). One this replica is delivering when trimmed is finished
from the body in memory. Memory is bounded per webhook (MAX_IN_FLIGHT): a stuck receiver
fills only its own.

Redis access is cluster-safe and never blocks a shared connection: one key per command,
no blocking reads (XREADGROUP is polled every POLL_INTERVAL_S), and a Redis error only
logs a warning; the loop keeps going and catches up when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT

from sidecar import alerts, keys, scripts, tasks
from sidecar.model import Webhook

log = logging.getLogger("sidecar.webhooks")

GROUP_PREFIX = "webhook:"
# Counts (once, over all replicas) the alerts the stream's cap trimmed before a group
# read them: lua/alert_drops.lua.
_DROPS = scripts.standalone("alert_drops")


@dataclass(frozen=True, slots=True)
class _Group:
    """One webhook's consumer group on one tenant's alerts stream."""

    tenant: str
    webhook: str  # the webhook's name (its current definition is looked up per attempt)

    @property
    def stream(self) -> str:
        return keys.tenant_keys(self.tenant).alerts

    @property
    def name(self) -> str:
        return GROUP_PREFIX + self.webhook


_Key = tuple[_Group, str]  # (group, stream entry id)


def signature(secret: bytes, body: bytes) -> str:
    """The X-Budget-Signature-256 value of a body: what a receiver recomputes to verify."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _entries(reply: Any) -> list[tuple[str | None, Mapping[str, str] | None]]:
    """The (id, fields) entries of an XREADGROUP reply for one stream, whatever shape the
    client's protocol gives it: [[stream, entries]] (RESP2) or {stream: entries} (RESP3,
    sometimes wrapped in one more list)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        values = list(reply.values())
        found = values[0] if values else []
        if found and isinstance(found[0], list):
            found = found[0]
        return list(found or [])
    return list(reply[0][1] or [])


class WebhookDeliverer:
    """Delivers every tenant's alerts (sidecar.alerts) to the configured webhooks, at least
    once, off the hot path."""

    # Tunables (class attributes so a test can shorten them on one instance).
    POLL_INTERVAL_S = 0.2
    # Entries pending this long at a consumer are taken over: its process is presumed dead.
    # Live deliveries renew their claim every REFRESH_INTERVAL_S, well inside this.
    CLAIM_IDLE_MS = 30_000
    CLAIM_INTERVAL_S = 5.0
    REFRESH_INTERVAL_S = 10.0
    BATCH = 100
    BACKOFF_INITIAL_S = 0.5
    BACKOFF_MAX_S = 60.0
    # Entries held in memory at once per webhook (deliveries and retries); beyond it,
    # reading for that webhook pauses (the stream keeps its alerts). Per webhook, not in
    # all: a receiver that hangs or fails for good fills only its own.
    MAX_IN_FLIGHT = 1000
    # Concurrent POSTs per webhook: a slow or dead receiver cannot starve the others.
    MAX_CONCURRENT_PER_WEBHOOK = 16
    # At most one warning per this long while Redis keeps failing.
    WARN_EVERY_S = 60.0

    def __init__(
        self,
        client: aioredis.Redis,
        webhooks: Callable[[], tuple[Webhook, ...]],
        tenants: Callable[[], Iterable[str]],
        name_of: Callable[[str, str], str | None],
        on_attempt: Callable[[bool], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        """`on_attempt(ok)` is told of every POST: answered 2xx or not (for metrics);
        `on_dropped(n)` of alerts the stream's cap trimmed before any delivery."""
        self._on_attempt = on_attempt
        self._on_dropped = on_dropped
        self._client = client
        self._webhooks = webhooks
        self._tenants = tenants
        self._name_of = name_of
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._session: aiohttp.ClientSession | None = None
        # Groups known to exist (XGROUP CREATE done); forgotten on NOGROUP.
        self._created: set[_Group] = set()
        # Groups this process has read from (their consumer is removed at shutdown).
        self._used: set[_Group] = set()
        self._tasks: dict[_Key, asyncio.Task[None]] = {}
        # Entries of self._tasks per webhook name (the MAX_IN_FLIGHT of each).
        self._in_flight: dict[str, int] = {}
        # Deliveries whose entry the stream's cap trimmed while they ran: no longer in the
        # group (no one else can take them over), finished here from the body in hand.
        self._trimmed: set[_Key] = set()
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._failing_since: float | None = None
        self._stopping = False
        self._last_warning = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    async def lifecycle(self) -> AsyncIterator[None]:
        """Runs the delivery loop between startup (before the yield) and shutdown."""
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "budget-sidecar-webhooks"},
            # Receivers are reached directly, not through proxies from the environment.
            trust_env=False,
        )
        self._stopping = False
        loop_task = asyncio.create_task(self._run(), name="webhook-deliverer")
        try:
            yield
        finally:
            self._stopping = True
            # The loop first, so that it starts no delivery after the others are stopped.
            # Cancelled deliveries stay pending in Redis: another replica (or this one,
            # restarted) claims them after CLAIM_IDLE_MS.
            await tasks.stop([loop_task], what="webhook delivery loop")
            await tasks.stop(self._tasks.values(), what="webhook deliveries")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._forget_consumer(), timeout=2.0)
            await self._session.close()
            self._session = None

    async def _forget_consumer(self) -> None:
        """Remove this process's consumer from the groups it used, where it holds nothing
        pending (DELCONSUMER drops a consumer's pending entries, so those keep it), so that
        restarts do not pile up dead consumers."""
        for group in self._used:
            try:
                pending = await self._client.xpending_range(
                    group.stream, group.name, min="-", max="+", count=1, consumername=self.consumer
                )
                if not pending:
                    await self._client.xgroup_delconsumer(group.stream, group.name, self.consumer)
            except (RedisError, OSError):
                return  # best effort: Redis is unwell, leave it

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        next_refresh = loop.time() + self.REFRESH_INTERVAL_S
        while not self._stopping:
            now = loop.time()
            try:
                groups = self._groups()
                if now >= next_refresh:
                    await self._refresh()
                    next_refresh = now + self.REFRESH_INTERVAL_S
                claim = now >= next_claim
                for group in groups:
                    await self._poll(group, claim)
                if claim:
                    next_claim = now + self.CLAIM_INTERVAL_S
                self._redis_ok()
            except (RedisError, OSError) as exc:
                # Connection trouble aborts the pass (every group would wait on the same
                # dead server); the next pass retries from where the stream left off.
                self._redis_failed(exc)
            except Exception:
                # A bug must not end alert delivery for the life of the process.
                log.exception("webhook delivery loop failed; continuing")
            await asyncio.sleep(self.POLL_INTERVAL_S)

    def _groups(self) -> list[_Group]:
        webhooks = self._webhooks()
        if not webhooks:
            return []
        return [
            _Group(tenant, w.name)
            for tenant in sorted(self._tenants())
            for w in webhooks
            if w.tenant is None or w.tenant == tenant
        ]

    def _webhook(self, group: _Group) -> Webhook | None:
        """The group's webhook as configured now (None: removed, or no longer this
        tenant's). Looked up per attempt so that a hot reload's new URL or secret applies
        to retries too."""
        for w in self._webhooks():
            if w.name == group.webhook and (w.tenant is None or w.tenant == group.tenant):
                return w
        return None

    async def _poll(self, group: _Group, claim: bool) -> None:
        try:
            if group not in self._created:
                await self._create(group)
            room = self._room(group)
            # No room: the stream keeps them; read once deliveries drain.
            if room > 0:
                self._used.add(group)
                reply = await self._client.xreadgroup(
                    group.name, self.consumer, {group.stream: ">"}, count=min(self.BATCH, room)
                )
                for entry_id, fields in _entries(reply):
                    if entry_id is not None and fields is not None:
                        await self._start_guarded(group, entry_id, fields)
            if claim:
                await self._claim(group)  # bounded by the room itself
                # Checked while the bound is full too: that is when the cap trims unread.
                dropped = await self._client.eval(_DROPS, 1, group.stream, group.name)
                self._dropped(group, int(dropped))
        except ResponseError as exc:
            # One group's trouble (e.g. its stream was deleted with the group) must not
            # stop the others.
            if "NOGROUP" in str(exc):
                self._created.discard(group)
            else:
                log.warning(
                    "webhook group %s on %s: %s", group.name, group.stream, exc,
                    extra={"webhook": group.webhook, "tenant": group.tenant},
                )  # fmt: skip

    def _dropped(self, group: _Group, count: int) -> None:
        """Alerts of `group` trimmed from the stream before they were delivered."""
        if count <= 0:
            return
        log.error(
            "%d alerts trimmed from %s before webhook %s delivered them: they are lost "
            "(the stream keeps the newest %s or so per tenant)",
            count, group.stream, group.webhook, "10,000",
            extra={"webhook": group.webhook, "tenant": group.tenant, "dropped": count},
        )  # fmt: skip
        if self._on_dropped is not None:
            self._on_dropped(count)

    def _room(self, group: _Group) -> int:
        """How many more entries the group's webhook may take into memory now."""
        return self.MAX_IN_FLIGHT - self._in_flight.get(group.webhook, 0)

    async def _create(self, group: _Group) -> None:
        try:
            # From the stream's start: alerts raised before this webhook's group existed
            # (or while no replica ran) are still delivered.
            await self._client.xgroup_create(group.stream, group.name, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._created.add(group)

    async def _claim(self, group: _Group) -> None:
        """Take over entries left pending by a consumer presumed dead."""
        cursor = "0-0"
        for _ in range(10):  # bounded per pass; the next pass goes on from the start
            room = self._room(group)
            if room <= 0:
                return
            reply = await self._client.xautoclaim(
                group.stream,
                group.name,
                self.consumer,
                min_idle_time=self.CLAIM_IDLE_MS,
                start_id=cursor,
                count=min(self.BATCH, room),
            )
            cursor, claimed = reply[0], reply[1]
            # Redis 7 drops trimmed entries from the group itself and lists them in
            # reply[2]; Redis 6.2 returns them with no fields: acknowledge those. Either
            # way a dead consumer's alert was trimmed before delivery: counted, logged.
            lost = len(reply[2]) if len(reply) > 2 and reply[2] else 0
            for entry_id, fields in claimed:
                if entry_id is None:
                    continue
                if fields is None:
                    await self._client.xack(group.stream, group.name, entry_id)
                    lost += 1
                    continue
                await self._start_guarded(group, entry_id, fields)
            self._dropped(group, lost)
            if cursor in ("0-0", "0"):
                return

    async def _refresh(self) -> None:
        """Renew this process's claim on the entries it is still delivering (their idle
        time would otherwise reach CLAIM_IDLE_MS during a long retry), and stop
        delivering those it no longer holds: acknowledged by another replica after a
        takeover, claimed by one, or trimmed."""
        by_group: dict[_Group, list[str]] = {}
        for group, entry_id in self._tasks:
            by_group.setdefault(group, []).append(entry_id)
        for group, ids in by_group.items():
            ordered = sorted(ids, key=_id_order)
            try:
                pending = await self._client.xpending_range(
                    group.stream,
                    group.name,
                    min=ordered[0],
                    max=ordered[-1],
                    count=self.MAX_IN_FLIGHT * 2,
                    consumername=self.consumer,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._created.discard(group)
                pending = []
            held = {str(p["message_id"]) for p in pending}
            for entry_id in ids:
                if entry_id not in held and (group, entry_id) not in self._trimmed:
                    task = self._tasks.get((group, entry_id))
                    if task is not None:
                        task.cancel()
            keep: list[StreamIdT] = [i for i in ordered if i in held]
            if keep:
                # JUSTID: resets the idle time without counting as another delivery.
                renewed = await self._client.xclaim(
                    group.stream, group.name, self.consumer, 0, keep, justid=True
                )
                # Redis 7 drops an entry the cap trimmed from the group at this XCLAIM
                # and leaves it out of the reply: nobody can take it over any more, so
                # its delivery goes on here (the body is in memory) instead of ending.
                got = {str(i) for i in renewed or ()}
                for kept in ordered:
                    if kept in held and kept not in got:
                        self._trimmed.add((group, kept))

    async def _start_guarded(self, group: _Group, entry_id: str, fields: Mapping[str, str]) -> None:
        """_start, where a bug met on one entry is logged and leaves it pending (claimed
        again later) instead of aborting the batch: the entries read or claimed with it
        are still delivered. Redis errors go up to the loop, as before."""
        try:
            await self._start(group, entry_id, fields)
        except (RedisError, OSError):
            raise
        except Exception:
            log.exception(
                "alert %s in %s could not be prepared for delivery", entry_id, group.stream,
                extra={"webhook": group.webhook, "tenant": group.tenant},
            )  # fmt: skip

    async def _start(self, group: _Group, entry_id: str, fields: Mapping[str, str]) -> None:
        key = (group, entry_id)
        if key in self._tasks:
            return  # already being delivered here (e.g. claimed back from ourselves)
        alert = alerts.parse_entry(
            group.tenant, fields, lambda budget_id: self._name_of(group.tenant, budget_id)
        )
        if alert is None:
            log.warning(
                "unreadable alert %s in %s acknowledged without delivery",
                entry_id, group.stream, extra={"webhook": group.webhook},
            )  # fmt: skip
            await self._client.xack(group.stream, group.name, entry_id)
            return
        body = _encode(alert)
        task = asyncio.create_task(
            self._deliver(group, entry_id, alert.id, body), name=f"webhook {alert.id}"
        )
        self._tasks[key] = task
        self._in_flight[group.webhook] = self._in_flight.get(group.webhook, 0) + 1
        task.add_done_callback(lambda t: self._finished(key, t))

    def _finished(self, key: _Key, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
            self._in_flight[key[0].webhook] -= 1
            self._trimmed.discard(key)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())

    # -- one delivery ---------------------------------------------------------------------

    async def _deliver(self, group: _Group, entry_id: str, alert_id: str, body: bytes) -> None:
        delay = self.BACKOFF_INITIAL_S
        attempt = 0
        while not self._stopping:
            webhook = self._webhook(group)
            if webhook is None:
                # Removed from the config: stop, and leave the entry pending in the group
                # (delivered by a later takeover if the webhook comes back).
                return
            attempt += 1
            async with self._slot(webhook.name):
                ok = await self._post(webhook, body, alert_id, attempt)
            if self._on_attempt is not None:
                self._on_attempt(ok)
            if ok:
                await self._ack(group, entry_id)
                return
            # Jitter spreads the retries of many alerts (and replicas) to one receiver.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.BACKOFF_MAX_S)

    def _slot(self, webhook: str) -> asyncio.Semaphore:
        slot = self._slots.get(webhook)
        if slot is None:
            slot = self._slots[webhook] = asyncio.Semaphore(self.MAX_CONCURRENT_PER_WEBHOOK)
        return slot

    async def _post(self, webhook: Webhook, body: bytes, alert_id: str, attempt: int) -> bool:
        """One attempt; True when the receiver answered 2xx."""
        assert self._session is not None  # lifecycle() runs the deliveries
        headers = {
            "Content-Type": "application/json",
            "X-Budget-Alert-Id": alert_id,
            "X-Budget-Signature-256": signature(webhook.secret, body),
            "X-Budget-Delivery": str(attempt),
        }
        extra = {"webhook": webhook.name, "alert_id": alert_id, "attempt": attempt}
        try:
            async with self._session.post(
                webhook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=webhook.timeout_ms / 1000),
                # A redirect is an answer, not a success: POSTs are not re-sent elsewhere.
                allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    log.info("alert delivered", extra={**extra, "status": resp.status})
                    return True
                log.warning("webhook answered %d", resp.status, extra=extra)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("webhook unreachable: %s", str(exc) or type(exc).__name__, extra=extra)
        return False

    async def _ack(self, group: _Group, entry_id: str) -> None:
        """XACK, retried a few times: a lost ack only means one more delivery later."""
        delay = self.BACKOFF_INITIAL_S
        for _ in range(5):
            try:
                await self._client.xack(group.stream, group.name, entry_id)
                return
            except (RedisError, OSError) as exc:
                log.warning("alert %s delivered but not acknowledged: %s", entry_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.BACKOFF_MAX_S)

    # -- Redis health, logged without flooding ----------------------------------------------

    def _redis_failed(self, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_warning >= self.WARN_EVERY_S:
            self._last_warning = now
            log.warning("webhook delivery cannot reach Redis, retrying: %s", exc)

    def _redis_ok(self) -> None:
        if self._failing_since is not None:
            self._failing_since = None
            self._last_warning = 0.0
            log.info("webhook delivery reaches Redis again")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encode(alert: alerts.Alert) -> bytes:
    """The alert's JSON body. Text no UTF-8 can carry (a lone surrogate, which a YAML
    "\\ud800" escape lets into a budget's name) becomes U+FFFD: the receiver still gets
    the alert, as valid JSON, instead of an entry that fails to encode on every try."""
    try:
        return msgspec.json.encode(alert)
    except UnicodeEncodeError:
        fields = {
            f: _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v
            for f, v in msgspec.structs.asdict(alert).items()
        }
        return msgspec.json.encode(msgspec.structs.replace(alert, **fields))


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
