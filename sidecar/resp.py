"""A minimal RESP2 connection with automatic pipelining, for the hot path only.

Every command issued while the event loop runs one tick is written to Redis in a single
`write()`; replies come back in order and are matched to their callers. Measured on the
development machine (see shared perf-baseline) this costs about 6 us of CPU per call,
against about 33 us for redis-py's pool / retry / timeout layers, and it lets concurrent
decisions share round trips. redis-py remains the client for everything off the hot path.

Supported URLs: redis://[user:password@]host[:port][/db], rediss:// (TLS), and
unix://[user:password@]/path[?db=N].
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

# Each argument's RESP bulk string (`$<length>\r\n<bytes>\r\n`), by its value. Most of a
# decision's arguments repeat from call to call (keys, budget ids, limits, thresholds):
# a lookup here instead of hiredis.pack_command's sprintf per argument halves the packing
# (callgrind, an authorize's 58 arguments: 76,000 instructions in hiredis, 37,000 here).
# Bounded: emptied when full, so values seen once (reservation ids, clocks) cannot grow it.
_CHUNKS: dict[str | int | bytes, bytes] = {}
_CHUNKS_MAX = 4096
_ARRAY_HEADS = [b"*%d\r\n" % n for n in range(256)]


def _chunk(arg: str | int | bytes) -> bytes:
    kind = type(arg)
    if kind is str:
        data = cast(str, arg).encode()
    elif kind is int:
        data = str(arg).encode()
    elif kind is bytes:
        data = cast(bytes, arg)
    else:  # what hiredis accepts or refuses (a float, a bool): its own packing
        raise _NotCached
    chunk = b"$%d\r\n%b\r\n" % (len(data), data)
    if len(_CHUNKS) >= _CHUNKS_MAX:
        _CHUNKS.clear()
    _CHUNKS[arg] = chunk
    return chunk


class _NotCached(Exception):
    pass


class Packed:
    """A command's last arguments packed once, for arguments that stay the same from call
    to call (a memo entry's budget arguments and fields, sidecar.resolution): as the last
    element of a command it stands for its `values`, and `_pack` copies their RESP instead
    of looking up each one (an authorize's ~40 constant arguments were most of its
    packing). Only this module's `_pack` reads one: every store sends through it."""

    __slots__ = ("data", "values")

    def __init__(self, values: tuple[str | int, ...]) -> None:
        self.values = values
        self.data = b"".join([_bulk(v) for v in values])


def _bulk(arg: str | int) -> bytes:
    if type(arg) is str:
        data = arg.encode()
    elif type(arg) is int:
        data = str(arg).encode()
    else:  # what _pack does not cache (a float, a bool): hiredis' own bulk string of it
        packed: bytes = hiredis.pack_command((arg,))
        return packed[len(b"*1\r\n") :]
    return b"$%d\r\n%b\r\n" % (len(data), data)


Arg = str | int | bytes | Packed


def _pack(args: tuple[Arg, ...]) -> bytes:
    """The command as RESP, byte for byte what hiredis.pack_command makes of it (a Packed
    last element: of the command with its values in its place). Only str, int and bytes
    are cached; str and bytes keys never equal each other or an int, and callers pass no
    floats or bools (the type says so), which could equal an int."""
    get = _CHUNKS.get
    last = args[-1] if args else None
    if type(last) is Packed:
        tail = last
        head = args[:-1]
        n = len(head) + len(tail.values)
    else:
        tail, head, n = None, args, len(args)
    try:
        body = b"".join([get(arg) or _chunk(arg) for arg in head])  # type: ignore[arg-type]
    except _NotCached:
        flat = head if tail is None else (*head, *tail.values)
        # hiredis' stub types the argument as a 1-tuple; it takes any tuple of arguments.
        packed: bytes = hiredis.pack_command(flat)  # type: ignore[arg-type]
        return packed
    if tail is not None:
        body += tail.data
    return (_ARRAY_HEADS[n] if n < 256 else b"*%d\r\n" % n) + body


class ConnectionLost(Exception):
    """The connection to Redis closed or could not be opened."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str | None
    port: int
    path: str | None
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Address:
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return cls(None, 0, parts.path, db, username, password, False)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        db = int(parts.path.lstrip("/") or 0)
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            None,
            db,
            username,
            password,
            parts.scheme == "rediss",
        )


class ReplyTimeout(ConnectionLost):
    """Redis did not answer the oldest waiting command in time; the connection is closed
    (replies come in order, so everything behind it is late too)."""


# How often the watchdog of a connection with commands waiting looks at the oldest one.
# Redis's time to answer is counted in these ticks, not in wall-clock time (see _Protocol).
TICK_S = 0.01


class _Protocol(asyncio.Protocol):
    """One Redis connection: commands out in one write per loop tick, replies matched in
    order, and a watchdog that tells a Redis that did not answer from a sidecar that was
    not running (invariant 10, slow is not down).

    Redis's time to answer a command is counted in watchdog ticks: a tick fired 60 ms late
    (the process was stopped at its CPU quota, or starved by neighbours) still counts as
    one tick, so the sidecar's own lag is never charged to Redis. A command is late once
    more than `reply_timeout_s` worth of ticks passed since it was sent, or once twice
    `reply_timeout_s` of wall-clock time did (the bound on how long a decision waits, even
    on a loop that is always late). Even then it is only suspected: the next tick (always
    after the loop has polled the socket once more: timers run before I/O in an iteration)
    confirms it. A reply that was already in the socket when the timer fired is so read
    before anything is declared late, however late the loop ran.
    """

    def __init__(self, reply_timeout_s: float, breaker: CircuitBreaker) -> None:
        self._loop = asyncio.get_running_loop()
        # Told of every reply and every failed command here, where they are seen, so a
        # caller awaits the reply's future itself, with no coroutine around it.
        self._breaker = breaker
        self._reader = hiredis.Reader(encoding="utf-8")
        # (future, tick when sent, loop time when sent) per command sent, in order:
        # replies arrive in this order.
        self._waiting: deque[tuple[asyncio.Future[Any], int, float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._timeout_s = reply_timeout_s
        # One watchdog timer per connection instead of a timer per call: it looks at the
        # oldest command only, at least five times per timeout.
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick_s = min(reply_timeout_s / 5, TICK_S)
        self._ticks = 0
        self._ticks_allowed = max(round(reply_timeout_s / self._tick_s), 1)
        self._wall_cap_s = 2 * reply_timeout_s
        self._suspect: asyncio.Future[Any] | None = None  # late at the last tick
        self.late_ticks = 0  # ticks that fired over a tick late: the loop's own lag
        self._due = 0.0
        self.closed = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        replied = False
        while (reply := self._reader.gets()) is not False:
            replied = True
            future, _, _ = self._waiting.popleft()
            if not future.done():  # its caller may have given up
                future.set_result(reply)
        if replied:
            self._breaker.success()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail_all(ConnectionLost(f"connection to Redis lost: {exc or 'closed by server'}"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_all(self, error: Exception) -> None:
        now = self._loop.time()
        while self._waiting:
            future, _, _ = self._waiting.popleft()
            if not future.done():  # a caller still waiting: one failure for the breaker
                future.set_exception(error)
                self._breaker.failure(now)

    def _schedule_watch(self) -> None:
        self._due = self._loop.time() + self._tick_s
        self._watchdog = self._loop.call_later(self._tick_s, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        self._ticks += 1
        now = self._loop.time()
        if now - self._due > self._tick_s:
            self.late_ticks += 1
        if not self._waiting:
            self._suspect = None
            return
        future, sent_tick, sent_at = self._waiting[0]
        if self._ticks - sent_tick > self._ticks_allowed or now - sent_at >= self._wall_cap_s:
            if self._suspect is future:  # still unanswered after one more read: late
                self._fail_all(
                    ReplyTimeout(f"redis did not answer within {self._timeout_s * 1000:.0f} ms")
                )
                self.close()
                return
            self._suspect = future
        else:
            self._suspect = None
        self._schedule_watch()

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; it goes out with the others of this loop tick."""
        if not self.alive:
            raise ConnectionLost("connection to Redis is closed")
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((future, self._ticks, loop.time()))
        self._buffer.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._schedule_watch()
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._buffer:
            self._transport.write(b"".join(self._buffer))
        self._buffer.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class CircuitBreaker:
    """Stops waiting on Redis while it is down.

    After `threshold` failures in a row (timeouts, refused or lost connections) it opens:
    calls fail at once, without touching Redis, for `cooldown_s`. Then one call at a time
    probes; a success closes it, a failure opens it again. A decision during an outage so
    costs nothing instead of the whole timeout, and the first call after Redis returns
    finds it at most `cooldown_s` later.
    """

    def __init__(self, *, threshold: int = 3, cooldown_s: float = 0.25) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self.opened = 0  # times it opened: for metrics and tests

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allow(self, now: float) -> bool:
        if not self.is_open:
            return True
        if now < self._open_until or self._probing:
            return False
        self._probing = True  # half-open: this call is the probe
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False

    def abandoned(self) -> None:
        """The probe's caller gave up on it (cancelled) before it was answered: its reply,
        if any, is still seen (success), but nothing else may report for it, so another
        call may probe now (else the breaker stays half-open, refusing every call)."""
        self._probing = False

    def failure(self, now: float) -> None:
        was_open = self.is_open
        self._failures += 1
        self._probing = False
        if self.is_open:
            if not was_open:
                self.opened += 1
            self._open_until = now + self.cooldown_s


class PipelinedConnection:
    """One auto-pipelining connection, reopened on demand after it is lost."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._address = Address.parse(url)
        self._timeout_s = timeout_s
        self.breaker = CircuitBreaker()
        # Whether the server may have Redis 7 functions (sidecar.store.run_script calls
        # FCALL while so): cleared by a server that has none, set again at each connect
        # (the server behind an address may be another one by then).
        self.functions = True
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        a = self._address

        def factory() -> _Protocol:
            return _Protocol(self._timeout_s, self.breaker)

        self.functions = True

        # Wall-clock, as the reply's own bound (twice the timeout): connects are rare (a
        # start, the probe after an outage), so a generous bound costs little.
        async with asyncio.timeout(2 * self._timeout_s):
            if a.path is not None:
                _, protocol = await loop.create_unix_connection(factory, a.path)
            else:
                context = ssl.create_default_context() if a.tls else None
                host = a.host or "127.0.0.1"
                _, protocol = await loop.create_connection(factory, host, a.port, ssl=context)
            try:
                handshake = []
                if a.password is not None:
                    auth = (a.username, a.password) if a.username else (a.password,)
                    handshake.append(protocol.send(_pack(("AUTH", *auth))))
                if a.db:
                    handshake.append(protocol.send(_pack(("SELECT", a.db))))
                for reply in await asyncio.gather(*handshake):
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionLost(f"Redis refused the handshake: {reply}")
            except BaseException:
                # Refused, timed out or cancelled mid-handshake: the socket goes with it.
                protocol.close()
                raise
        return protocol

    async def _protocol_ready(self) -> _Protocol:
        if self._protocol is not None and self._protocol.alive:
            return self._protocol
        # One connect at a time; concurrent callers wait for the same attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            self._protocol = await asyncio.shield(connecting)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to Redis: {exc}") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if connecting.cancelled() and (task is None or task.cancelling() == 0):
                # The connect was ended by close(), not this caller: a lost connection.
                raise ConnectionLost("connection to Redis closed while connecting") from None
            raise
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        return self._protocol

    def execute(self, *args: str | int | bytes) -> Awaitable[Any]:
        """call() with the command's words as arguments."""
        return self.call(args)

    def call(self, args: tuple[Arg, ...]) -> Awaitable[Any]:
        """Send one command; await the result for its reply (a hiredis.ReplyError is
        returned, not raised, so callers can tell NOSCRIPT from a broken script).

        Awaiting raises ConnectionLost (ReplyTimeout when Redis did not answer within the
        timeout, counted while the sidecar runs, and at most twice it of wall-clock time:
        see _Protocol; connecting gets twice the timeout too).

        On an open connection with the breaker closed (every call but the first and those
        during an outage) the result is the reply's future itself: a decision awaits it
        directly, without a coroutine frame of this method in between."""
        protocol = self._protocol
        if protocol is not None and protocol.alive and not self.breaker.is_open:
            return protocol.send(_pack(args))
        return self._connect_and_execute(args)

    async def open(self) -> None:
        """Connect now if not connected (raises ConnectionLost): the next execute() calls
        then go out in the order they are made, in one write."""
        await self._protocol_ready()

    async def _connect_and_execute(self, args: tuple[Arg, ...]) -> Any:
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        probe = breaker.is_open  # allowed while open: this call is the half-open probe
        if not breaker.allow(loop.time()):
            raise ConnectionLost("redis failed just now; not waiting on it (circuit open)")
        try:
            protocol = self._protocol
            if protocol is None or not protocol.alive:
                protocol = await self._protocol_ready()
            future = protocol.send(_pack(args))
        except ConnectionLost:
            breaker.failure(loop.time())
            raise
        except asyncio.CancelledError:
            if probe:
                breaker.abandoned()
            raise
        try:
            return await future  # the protocol tells the breaker how the reply went
        except asyncio.CancelledError:
            # A cancelled future is skipped by the protocol's failure count (_fail_all):
            # a probe given up on would never report, and the breaker stay half-open.
            if probe:
                breaker.abandoned()
            raise

    async def close(self) -> None:
        # A connect in flight goes too: it runs shielded from its callers (they share it),
        # so one whose callers were all cancelled (a background check stopped at shutdown,
        # a start-up check past its bound) still runs, or holds its open protocol until a
        # next caller claims it; closed only through self._protocol, its socket would stay
        # open after the store closed, for the garbage collector to find.
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()  # asyncio closes a socket its cancelled connect made
            (made,) = await asyncio.gather(connecting, return_exceptions=True)
            if isinstance(made, _Protocol) and made is not self._protocol:
                made.close()
                await made.closed
        if self._protocol is not None:
            self._protocol.close()
            await self._protocol.closed
            self._protocol = None
