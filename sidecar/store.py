"""The store: the only module that talks to Redis.

Every hot-path operation is one EVALSHA (invariant 5), sent over one auto-pipelining
connection (sidecar.resp): the script calls of one event-loop tick share one write and one
round trip, each still its own atomic script. redis-py serves what is off the hot path
(readiness, later the admin routes).

Each operation runs as a function of this version's library (sidecar.scripts.Library,
FCALL) where the server has Redis 7 functions, and as its script (EVALSHA) where it has not
(Redis 6.2, or FCALL refused by the server's ACL): the first FCALL a connection's server
does not know as a command tells it, and that connection uses EVALSHA from then on.

Neither is loaded ahead of time. A function the server does not have ("Function not
found": a fresh server, a FUNCTION FLUSH, a replica or Cluster primary that never saw the
library) loads the library and repeats the call once; a NOSCRIPT reply repeats the call
once as EVAL with the script's source, which also caches it for the next EVALSHAs. A call
refused so did not run, so the repeat cannot charge twice; and the repeat of a function
that is missing again (a flush between the load and the repeat) is an EVAL, which needs
nothing loaded. So the store heals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, cast
from urllib.parse import quote, unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar import tasks
from sidecar.resp import ConnectionLost, PipelinedConnection
from sidecar.scripts import LIBRARY_PREFIX, Script


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


async def run_script(
    conn: PipelinedConnection,
    script: Script,
    keys: Sequence[str],
    args: Sequence[str | int],
    *,
    asking: bool = False,
    on_noscript: Callable[[], None] | None = None,
) -> Any:
    """FCALL of the script's function (EVALSHA where the server has no functions) on one
    connection; a function or script the server lacks is loaded and the call repeated
    once (see the module's note). Other error replies are returned for the caller to judge
    (MOVED, ASK...).
    `asking`: each script call goes right after an ASKING (Redis Cluster, a slot importing).
    `on_noscript`: told of a NOSCRIPT or a missing function (a restarted Redis may have lost
    its state too: sidecar.state_loss checks its marker then, off this call's path).

    EVAL, not SCRIPT LOAD then EVALSHA again: another client's SCRIPT FLUSH (or a second
    failover) between the load and the repeat would answer NOSCRIPT again, a 500."""
    try:
        if script.function and conn.functions:
            call = ("FCALL", script.function, len(keys), *keys, *args)
            reply = await (_after_asking(conn, call) if asking else conn.call(call))
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            text = str(reply)
            if text.startswith((_NO_FCALL, _NOT_COMMAND)):
                conn.functions = False  # Redis 6.2, or FCALL not allowed: EVALSHA below
            elif text.startswith(_NO_FUNCTION):
                if on_noscript is not None:
                    on_noscript()
                reply = await _load_and_repeat(conn, script, keys, args, asking)
                return _judged(script, reply)
            else:
                return _judged(script, reply)
        call = ("EVALSHA", script.sha, len(keys), *keys, *args)
        reply = await (_after_asking(conn, call) if asking else conn.call(call))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            if on_noscript is not None:
                on_noscript()
            call = ("EVAL", script.source, len(keys), *keys, *args)
            reply = await (_after_asking(conn, call) if asking else conn.call(call))
    except ConnectionLost as exc:
        raise StoreUnavailable(str(exc)) from exc
    return _judged(script, reply)


async def _load_and_repeat(
    conn: PipelinedConnection,
    script: Script,
    keys: Sequence[str],
    args: Sequence[str | int],
    asking: bool,
) -> Any:
    """Load the library the function is missing from, then repeat the call once: as FCALL
    when the library is there now (loaded here, or by another sidecar just before), else
    as EVAL of its script (a load this server refuses, or a flush since the load)."""
    assert script.library is not None
    loaded = await conn.call(("FUNCTION", "LOAD", script.library.source))
    if isinstance(loaded, hiredis.ReplyError):
        text = str(loaded)
        if text.startswith((_NO_FCALL, _NOT_COMMAND)):
            conn.functions = False  # FCALL answers but the library may not be loaded here
    if not isinstance(loaded, hiredis.ReplyError) or _LOADED_BEFORE in str(loaded):
        call: tuple[str | int, ...] = ("FCALL", script.function, len(keys), *keys, *args)
        reply = await (_after_asking(conn, call) if asking else conn.call(call))
        if not isinstance(loaded, hiredis.ReplyError):
            await _collect_libraries(conn, script.library.name)
        if not (isinstance(reply, hiredis.ReplyError) and str(reply).startswith(_NO_FUNCTION)):
            return reply
    call = ("EVAL", script.source, len(keys), *keys, *args)
    return await (_after_asking(conn, call) if asking else conn.call(call))


# Libraries of sidecar versions a server keeps (each about 300 KB of its memory): every
# version loads its own, and nothing tells one a version has gone. Past this many, the
# version that loads its library deletes every other one; a version still running loads
# its own again at its next call (one more round trip, once), so while at most this many
# versions run side by side no load deletes one of them twice.
MAX_LIBRARIES = 4


async def _collect_libraries(conn: PipelinedConnection, own: str) -> None:
    """After this version loaded `own`: the other versions' libraries deleted if, with it,
    there are more than MAX_LIBRARIES (invariant 11: what is written is collected). Best
    effort: an error reply or a lost connection leaves them for the next load."""
    with contextlib.suppress(ConnectionLost):
        listed = await conn.call(("FUNCTION", "LIST", "LIBRARYNAME", f"{LIBRARY_PREFIX}*"))
        if isinstance(listed, hiredis.ReplyError):
            return
        names = [lib[lib.index("library_name") + 1] for lib in listed]
        if len(names) <= MAX_LIBRARIES:
            return
        for name in names:
            if name != own and name.startswith(LIBRARY_PREFIX):
                await conn.call(("FUNCTION", "DELETE", name))


def _judged(script: Script, reply: Any) -> Any:
    """The reply, or the StoreError an error reply means (MOVED and ASK returned)."""
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if transient_reply(text):
            raise StoreUnavailable(f"{script.name}.lua: {text}")
        if not text.startswith(("MOVED", "ASK")):
            raise StoreError(f"{script.name}.lua failed: {text}")
    return reply


# FCALL of a function no library of the server defines (Redis 7.0: "ERR Function not
# found"); a server without functions (Redis 6.2: "ERR unknown command 'FCALL'...", in
# quotes or backticks by version), or one whose ACL refuses FCALL or FUNCTION ("NOPERM");
# FUNCTION LOAD of a library another sidecar of this version loaded first.
_NO_FUNCTION = "ERR Function not found"
_NOT_COMMAND = "ERR unknown command"
_NO_FCALL = "NOPERM"
_LOADED_BEFORE = "already exists"


async def _after_asking(conn: PipelinedConnection, call: tuple[str | int, ...]) -> Any:
    # ASKING holds for the connection's next command only: both are queued in this tick,
    # so they are written back to back, in this order (the caller connected first).
    _, reply = await asyncio.gather(conn.execute("ASKING"), conn.call(call))
    return reply


# Error replies that mean "not now" rather than "never": a cluster mid-failover, a replica
# still loading its data, a server refusing writes it cannot persist, a server busy with
# another client's long script (BUSY: ours did not run), a server at maxmemory with
# noeviction (OOM: Redis refuses a script's first write, so nothing of it was written), a
# primary short of the replicas `min-replicas-to-write` asks for (NOREPLICAS: refused the
# same way, at the first write).
_TRANSIENT = (
    "CLUSTERDOWN",
    "TRYAGAIN",
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "MISCONF",
    "BUSY ",
    "OOM ",
    "NOREPLICAS",
)
# A SCRIPT KILL or FUNCTION KILL (an operator's, redis-cli's) of ours while it ran: Redis allows it
# only before the script's first write, so nothing of it was written. Redis 7 answers
# "ERR Script killed by user with SCRIPT KILL... script: <sha>, on @user_script:<line>."
# (Redis 6 wraps the same words in "ERR Error running script ..."): matched inside.
_KILLED = "Script killed by user with SCRIPT KILL"
# redis-py's words before the error reply of one command of a pipeline.
_PIPELINE_ERROR = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: \(?'?", re.DOTALL)


def transient_reply(text: str) -> bool:
    """Whether an error reply (hiredis's, or the text of redis-py's ResponseError, one of a
    pipeline's included) means "not now": the fail mode applies, as to a Redis away."""
    text = _PIPELINE_ERROR.sub("", text, count=1)
    return text.startswith(_TRANSIENT) or _KILLED in text


async def _ping(client: aioredis.Redis | RedisCluster, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(max(timeout_s, 0.2)):
            return bool(await client.ping())
    except (RedisError, OSError, TimeoutError):
        return False


def masked_url(url: str) -> str:
    """The URL with its password (if any) shown as ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, hosts = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return parts._replace(netloc=f"{name}:***@{hosts}").geturl()


def open_store(url: str, *, timeout_ms: int) -> Store:
    """The Store a Redis URL names: redis://, rediss://, unix:// (one server),
    redis+cluster://host:port[,host:port...] (Redis Cluster), or
    redis+sentinel://host:port[,host:port...]/service[/db] (Sentinel)."""
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        return ClusterStore(url, timeout_ms=timeout_ms)
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        return SentinelStore(url, timeout_ms=timeout_ms)
    return RedisStore(url, timeout_ms=timeout_ms)


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    out = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        out.append((host or "127.0.0.1", int(port) if port else default_port))
    return out


class RedisStore:
    """A Store over one standalone Redis (unix or TCP, optionally TLS)."""

    def __init__(self, url: str, *, timeout_ms: int) -> None:
        self._timeout_s = timeout_ms / 1000
        self._hot = PipelinedConnection(url, timeout_s=self._timeout_s)
        self.on_noscript: Callable[[], None] | None = None
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

    def run(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> Coroutine[Any, Any, Any]:
        # run_script's coroutine itself: one frame fewer on every decision.
        return run_script(self._hot, script, keys, args, on_noscript=self.on_noscript)

    async def ping(self) -> bool:
        return await _ping(self._client, self._timeout_s)

    async def close(self) -> None:
        await self._hot.close()
        await self._client.aclose()


class ClusterStore:
    """A Store over Redis Cluster.

    Every key of one call carries its tenant's hash tag (sidecar.keys), so the call goes
    whole to the primary that owns that slot, over that primary's auto-pipelining
    connection; tenants spread over the primaries by their tags. redis-py's cluster
    client keeps the slot map and serves the calls off the hot path. A MOVED or ASK reply
    (the script did not run) refreshes the map and repeats the call on the right node; a
    lost connection (a primary died) fails the call into the fail mode and refreshes the
    map in the background, so calls resume once a replica is promoted.
    """

    def __init__(self, url: str, *, timeout_ms: int) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme.startswith("rediss")
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        netloc = parts.netloc.rpartition("@")[2]
        self._timeout_s = timeout_ms / 1000
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in _hosts(netloc, 6379)],
            decode_responses=True,
            username=self._username,
            password=self._password,
            ssl=self._tls,
            socket_connect_timeout=max(self._timeout_s, 0.2),
            socket_timeout=max(self._timeout_s, 1.0),
        )
        self._connections: dict[tuple[str, int], PipelinedConnection] = {}
        self._initialized = False
        self._refresh_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.on_noscript: Callable[[], None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        # The cluster client offers the commands the off-hot-path callers use.
        return cast(aioredis.Redis, self._client)

    async def _refresh(self) -> None:
        async with self._refresh_lock, asyncio.timeout(max(self._timeout_s, 1.0)):
            if not self._initialized:
                await self._client.initialize()
                self._initialized = True
                return
            manager = self._client.nodes_manager
            before = dict(manager.nodes_cache)
            await manager.initialize()
            # redis-py replaces the node objects of a new slot map without closing the old
            # ones' connections (a dead primary's included): close what it dropped.
            for name, node in before.items():
                if manager.nodes_cache.get(name) is not node:
                    await node.disconnect()

    def _refresh_later(self) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._refresh()

    def _connection(self, key: str) -> PipelinedConnection:
        node = self._client.get_node_from_key(key)
        if node is None:
            raise StoreUnavailable(f"no cluster node serves the slot of {key!r}")
        address = (str(node.host), int(node.port))
        conn = self._connections.get(address)
        if conn is None:
            auth = ""
            if self._password is not None:
                auth = f"{quote(self._username or '', safe='')}:{quote(self._password, safe='')}@"
            scheme = "rediss" if self._tls else "redis"
            url = f"{scheme}://{auth}{node.host}:{node.port}/0"
            conn = self._connections[address] = PipelinedConnection(url, timeout_s=self._timeout_s)
        return conn

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            if not self._initialized:
                await self._refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot read the cluster's slot map: {exc}") from exc
        conn = self._connection(keys[0])
        try:
            reply = await run_script(conn, script, keys, args, on_noscript=self.on_noscript)
        except StoreUnavailable:
            self._refresh_later()
            raise
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)  # MOVED <slot> <host:port> or ASK <slot> <host:port>
            host, _, port = text.split()[2].rpartition(":")
            if text.startswith("ASK"):
                # Mid-migration: this one call goes to the importing node, after ASKING
                # (connected first, so that the two are written back to back).
                target = self._connection_to(host, int(port))
                try:
                    await target.open()
                except ConnectionLost as exc:
                    raise StoreUnavailable(str(exc)) from exc
                reply = await run_script(
                    target, script, keys, args, asking=True, on_noscript=self.on_noscript
                )
            else:
                try:
                    await self._refresh()
                except (RedisError, OSError, TimeoutError) as exc:
                    raise StoreUnavailable(f"cannot refresh the slot map: {exc}") from exc
                reply = await run_script(
                    self._connection(keys[0]), script, keys, args, on_noscript=self.on_noscript
                )
            if isinstance(reply, hiredis.ReplyError):
                raise StoreUnavailable(f"{script.name}.lua: {reply} after a redirect")
        return reply

    def _connection_to(self, host: str, port: int) -> PipelinedConnection:
        conn = self._connections.get((host, port))
        if conn is None:
            scheme = "rediss" if self._tls else "redis"
            conn = PipelinedConnection(f"{scheme}://{host}:{port}/0", timeout_s=self._timeout_s)
            self._connections[(host, port)] = conn
        return conn

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self._timeout_s, 0.2)):
                if not self._initialized:
                    await self._refresh()
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await tasks.stop(self._background, what="cluster map refreshes")
        for conn in self._connections.values():
            await conn.close()
        await self._client.aclose()


class SentinelStore:
    """A Store over a Sentinel-managed primary: the sentinels name the primary; after a
    lost connection (a failover) the next calls ask them again."""

    def __init__(self, url: str, *, timeout_ms: int) -> None:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// URL needs the service name: .../mymaster[/db]")
        self._service = path[0]
        self._db = int(path[1]) if len(path) > 1 else 0
        self._password = unquote(parts.password) if parts.password else None
        self._timeout_s = timeout_ms / 1000
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _hosts(netloc, 26379),
            socket_timeout=max(self._timeout_s, 0.2),
            socket_connect_timeout=max(self._timeout_s, 0.2),
        )
        self._client: aioredis.Redis = self._sentinel.master_for(
            self._service,
            decode_responses=True,
            password=self._password,
            db=self._db,
            socket_connect_timeout=max(self._timeout_s, 0.2),
            socket_timeout=max(self._timeout_s, 1.0),
        )
        self._hot: PipelinedConnection | None = None
        self._primary: tuple[str, int] | None = None
        self.on_noscript: Callable[[], None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def _connection(self) -> PipelinedConnection:
        if self._hot is None:
            try:
                async with asyncio.timeout(max(self._timeout_s, 0.2)):
                    host, port = await self._sentinel.discover_master(self._service)
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreUnavailable(f"no primary for {self._service!r}: {exc}") from exc
            auth = f":{quote(self._password, safe='')}@" if self._password else ""
            self._primary = (host, port)
            self._hot = PipelinedConnection(
                f"redis://{auth}{host}:{port}/{self._db}", timeout_s=self._timeout_s
            )
        return self._hot

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        conn = await self._connection()
        try:
            reply = await run_script(conn, script, keys, args, on_noscript=self.on_noscript)
        except StoreUnavailable:
            # Perhaps a failover: ask the sentinels again on the next call.
            self._hot = None
            await conn.close()
            raise
        return reply

    async def ping(self) -> bool:
        return await _ping(self._client, self._timeout_s)

    async def close(self) -> None:
        if self._hot is not None:
            await self._hot.close()
        await self._client.aclose()
        for sentinel in self._sentinel.sentinels:
            await sentinel.aclose()
