"""The fast path: the hot routes (POST /v1/authorize, /v1/check, /v1/settle, /v1/release
and /ext_authz) served by an `asyncio.Protocol` with `httptools` parsing, on the same port
and in the same process as aiohttp, which serves every other route (issue 20).

Why: under load most of a decision's CPU was aiohttp's own per-request machinery (its
request object and payload stream, the task and the response writer), not the decision.

What stays the same, by construction rather than by copy:
- the handler of each hot route is the one registered in the app's router, wrapped in the
  app's own middlewares (credentials, body rules, problem+json mapping, request ids), so
  the request parsing of sidecar.api.native/proxy/bodies/problems runs unchanged on a
  `FastRequest` that offers the part of aiohttp's request API they read;
- every request this protocol does not serve verbatim goes to aiohttp with the bytes it
  sent: the connection, from that request on, belongs to aiohttp's own RequestHandler. That
  is any other route; anything unusual on a hot one (a body that did not arrive in the same
  read as its head, chunked, compressed, `Expect`, an upgrade, a declared length over the
  limit, a non-ASCII header, HTTP/1.0, a percent-encoded or dot-segment path, a head
  aiohttp's limits refuse); and anything httptools cannot parse. aiohttp then answers it as
  it always did: slow clients, 408, 413 with lingering, parse errors.
  What arrives for aiohttp while a hot request of the connection is still being answered
  waits for it (at most _MAX_PENDING bytes read), with the client's end of file if one came.

`settings.fast_http: false` turns it off (aiohttp serves everything).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import httptools
from aiohttp import hdrs, web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import SINGLETON_HEADERS
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.api import native, problems, proxy, undelivered
from sidecar.api.connection import SidecarApplication, SidecarServer

log = logging.getLogger("sidecar.http")

# What a hot route answers here: a response, or the body of a 200 `application/json` one
# (with its own header fields: native.Headed).
Handler = Callable[[web.Request], Awaitable["web.StreamResponse | bytes | native.Headed"]]


# The app's guard middleware and a hot route's body handler in one call (api.app.guard);
# set on the app when the guard is its only middleware. Without it, the middleware chain.
class Whole(Protocol):
    def __call__(
        self, request: web.Request, handler: native.BodyHandler
    ) -> Awaitable[web.Response | bytes | native.Headed]: ...


WHOLE: web.AppKey[Whole] = web.AppKey("fast_whole")
# The head of a 200 JSON answer as aiohttp writes it for web.Response(body=...,
# content_type="application/json") on a kept-alive connection: Content-Type, then the
# Content-Length, Date and Server it adds (tests/test_fast_path.py compares the bytes).
_HEAD_200_JSON = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n"
    b"Date: %b\r\nServer: " + SERVER_SOFTWARE.encode() + b"\r\n\r\n%b"
)
# POST paths served here; /ext_authz and below it (any method) too.
HOT_POSTS = ("/v1/authorize", "/v1/check", "/v1/settle", "/v1/release")
_PREFIX = proxy.PREFIX.encode()
# Pipelined requests waiting before the connection stops reading (aiohttp's bound too).
_MAX_QUEUED = 32
# Bytes left for aiohttp that wait while a hot request is answered, before the connection
# stops reading (what aiohttp would read ahead of its parser: its payload's high water).
_MAX_PENDING = 64 * 1024
# Headers whose presence sends a hot request to aiohttp: it decodes, continues, upgrades.
# Sec-WebSocket-Key1 too: aiohttp refuses it (the old websocket spec) with a 400.
_HANDED_OFF_HEADERS = frozenset(
    {b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"sec-websocket-key1"}
)
# Headers aiohttp refuses to see twice (a 400: two Hosts or two Content-Types are how a
# request is smuggled past a proxy that reads the other one). Its own list, so they agree.
_SINGLETONS = frozenset(name.lower().encode() for name in SINGLETON_HEADERS)


def _header_lines(fields: dict[str, str]) -> bytes:
    """Header fields as they go on the wire. Their names and values are the sidecar's own
    (limit_headers: ids that passed ID_PATTERN, numbers), never a client's text."""
    return "".join(f"{name}: {value}\r\n" for name, value in fields.items()).encode()


def _internal_error() -> web.Response:
    """As SidecarRequestHandler answers an exception that escaped the middlewares."""
    response = problems.response(problems.ProblemError(500, "internal error"))
    response.force_close()
    return response


class _HandOff(Exception):
    """Raised inside a parser callback: this request (and the connection) go to aiohttp."""


class MatchInfo(dict[str, str]):
    """What the middlewares read of aiohttp's match info: a hot route always matched."""

    http_exception: web.HTTPException | None = None

    def __init__(self, app: web.Application) -> None:
        super().__init__()
        self.current_app = app


class FastRequest(dict[str, Any]):
    """The part of `web.Request` the hot routes' middlewares and handlers read, for one
    request whose head and whole body have arrived. A dict, as aiohttp's request is a
    mapping (the principal is stored in it)."""

    __slots__ = ("_body", "app", "headers", "keep_alive", "match_info", "method", "path",
                 "raw_path", "transport")  # fmt: skip

    version = HttpVersion11

    def __init__(
        self,
        app: web.Application,
        method: str,
        path: str,
        raw_path: str,
        headers: CIMultiDictProxy[str] | CIMultiDict[str],
        body: bytes,
        keep_alive: bool,
        match_info: MatchInfo,
        transport: asyncio.Transport | None = None,
    ) -> None:
        # (dict's own __init__ is not called: the mapping starts empty without it.)
        self.app = app
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.headers = headers
        self._body = body
        self.keep_alive = keep_alive
        self.match_info = match_info
        self.transport = transport  # as aiohttp's (api.origin reads its local port)

    # Body: received whole before the handler runs.
    @property
    def can_read_body(self) -> bool:
        return bool(self._body)

    @property
    def body_exists(self) -> bool:
        return bool(self._body)

    @property
    def content(self) -> FastRequest:
        return self  # only `is_eof()` is read of it

    def is_eof(self) -> bool:
        return True

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return None if value is None else int(value)

    @property
    def content_type(self) -> str:
        raw = self.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")
        return raw.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode()

    @property
    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]

    @property
    def rel_url(self) -> Any:
        from yarl import URL

        return URL(self.raw_path)

    @property
    def query(self) -> Any:
        return self.rel_url.query


class FastServer(SidecarServer):
    """The sidecar's Server whose connections start on a FastProtocol (and go on, when
    handed off, on its SidecarRequestHandler). Made from the Server aiohttp built (same
    handler, kwargs and connection registry), by `adopt`."""

    app: web.Application
    keepalive_timeout: float
    max_line_size: int
    max_field_size: int
    max_headers: int
    max_body: int
    # Requests this server's FastProtocols served; connections they gave to aiohttp.
    served: int
    handed_off: int
    _hot: dict[str, Handler] | None
    _ext_authz: Handler | None

    @classmethod
    def adopt(cls, server: web.Server, app: web.Application) -> FastServer:
        fast = cls.__new__(cls)
        fast.__dict__.update(server.__dict__)
        fast.request_ids = getattr(server, "request_ids", False)
        fast.app = app
        fast._hot = None
        fast._ext_authz = None
        fast.served = fast.handed_off = 0
        kwargs = server._kwargs
        fast.keepalive_timeout = float(kwargs.get("keepalive_timeout", 3630))
        fast.max_line_size = int(kwargs.get("max_line_size", 8190))
        fast.max_field_size = int(kwargs.get("max_field_size", 8190))
        fast.max_headers = int(kwargs.get("max_headers", 128))
        fast.max_body = app._client_max_size
        return fast

    def __call__(self) -> Any:  # an asyncio protocol factory
        return FastProtocol(self)

    def aiohttp_protocol(self) -> RequestHandler:
        return super().__call__()

    def hot(self) -> dict[str, Handler]:
        """path -> the route's handler inside the app's middlewares, built once (the
        router and the middlewares are frozen by then)."""
        if self._hot is None:
            found: dict[str, Handler] = {}
            whole = self.app.get(WHOLE)
            body_handlers = self.app.get(native.HOT, {})
            for route in self.app.router.routes():
                canonical = route.resource.canonical if route.resource is not None else ""
                if route.method == hdrs.METH_POST and canonical in HOT_POSTS:
                    body_handler = body_handlers.get(canonical)
                    if whole is not None and body_handler is not None:
                        found[canonical] = functools.partial(whole, handler=body_handler)
                    else:
                        found[canonical] = self._wrapped(route.handler)
                elif canonical == proxy.PREFIX:
                    self._ext_authz = self._wrapped(route.handler)
            self._hot = found
        return self._hot

    def ext_authz(self) -> Handler | None:
        self.hot()
        return self._ext_authz

    def _wrapped(self, handler: Any) -> Handler:
        # As aiohttp's Application._handle does it for every request.
        for middleware in reversed(self.app.middlewares):
            handler = functools.partial(middleware, handler=handler)
        return cast(Handler, handler)


with warnings.catch_warnings():
    # aiohttp discourages subclassing Application; this one only changes which protocol
    # its Server starts connections on, so TestServer and AppRunner both get it.
    warnings.simplefilter("ignore", DeprecationWarning)

    class FastApplication(SidecarApplication):
        __slots__ = ()

        def _make_handler(self, **kwargs: Any) -> web.Server:
            return FastServer.adopt(super()._make_handler(**kwargs), self)


class FastProtocol(asyncio.Protocol):
    """One connection: serves its hot requests in order (pipelined ones queued) until one
    is not for it, then hands the connection, with that request's bytes, to aiohttp."""

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._app = server.app
        self._loop = asyncio.get_event_loop()
        self._hot = server.hot()
        self._ext_authz = server.ext_authz()
        # The hot POST routes' match info, shared: nothing writes to it (only /ext_authz
        # sets its "tail", on a match info of its own).
        self._post_match = MatchInfo(self._app)
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[tuple[FastRequest, Handler]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._handler: Handler | None = None  # of the request being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._singletons: set[bytes] = set()  # of _SINGLETONS, seen in this request's head
        self._last_name = 0  # the length of the last header name of this request's head
        self._body: list[bytes] = []
        self._in_message = False
        self._completed = 0  # requests completed in the read being parsed
        self._pending: list[bytes] | None = None  # set: bytes for aiohttp, once idle
        self._pending_size = 0
        self._pending_full = False  # reading paused: _MAX_PENDING bytes wait for aiohttp
        self._closing = False
        self._eof = False  # the client half-closed: close once what it sent is answered
        self._paused = False  # reading paused: too many pipelined requests queued
        self._write_paused = False  # reading paused: the client does not read its answers
        self._idle_since = 0.0
        self._keepalive: asyncio.TimerHandle | None = None

    # -- the registry of aiohttp's Server (graceful shutdown waits for our requests too)
    @property
    def _task_handler(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def idle(self) -> bool:
        """Between requests (no request queued, answered or arriving with its body; a head
        not whole yet counts as idle, as aiohttp's keep-alive timer has it): a connection
        the bound on connections may close to make room (connection.SidecarServer)."""
        receiving = self._in_message and bool(self._body)
        return self._task is None and not self._queue and self._pending is None and not receiving

    def close(self) -> None:
        """Close once the requests received are answered (aiohttp's pre-shutdown)."""
        self._closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        self._closing = True
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            if not task.done():
                task.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        sock = t.get_extra_info("socket")
        if sock is not None:  # as aiohttp does: no Nagle delay, TCP keep-alive probes
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._server.connection_made(cast(RequestHandler, self), t)
        self._idle_since = now = self._loop.time()
        timeout = self._server.keepalive_timeout
        if timeout > 0:
            self._keepalive = self._loop.call_at(now + timeout, self._check_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.connection_lost(cast(RequestHandler, self), exc)
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._transport = None
        self._queue.clear()

    def pause_writing(self) -> None:
        # A client not reading its answers: stop reading its requests until it does.
        self._write_paused = True
        self._transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._paused and not self._pending_full:
            self._transport.resume_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        """A client may shut down its sending side after its last request (RFC 9112 §9.6)
        and still read the answers: keep the transport open for them, then close. (The
        transport's default, which aiohttp keeps, closes at once: a request whose decision
        was already held in Redis then goes unanswered.) Bytes left for aiohttp get the
        end of file with them, once it has the connection: it answers what is whole of
        them and closes as it closes (a request cut off mid-way: at once)."""
        if self._task is None:
            return None
        self._eof = True
        return True

    def data_received(self, data: bytes) -> None:
        if self._pending is not None:
            self._wait_for_aiohttp(data)
            return
        self._completed = 0
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # A request not for this path (_HandOff), a head httptools refuses, or an
            # upgrade: aiohttp parses a whole read before it answers any of it, and answers
            # a read that does not parse with one 400 (a short Content-Length, data after
            # `Connection: close`, a bad request after another route's). So the requests of
            # this read complete before it are not served here (none has started: it is
            # still this call), and aiohttp gets all of it: what it answers (or refuses)
            # of the read is what it would answer alone.
            self._unqueue(self._completed)
            self._completed = 0
            self._hand_off(data)
            return
        if self._in_message:
            self._hand_off(data)  # the rest of a request comes in a later read

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = []
        self._last_name = 0
        if self._singletons:
            self._singletons = set()
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url  # httptools may call it more than once
        if len(self._url) > self._server.max_line_size:
            raise _HandOff  # aiohttp's 400 for a request line over its limit
        method = self._parser.get_method()
        path = self._url.partition(b"?")[0]
        if method == b"POST":
            handler = self._hot.get(path.decode("latin-1"))
            if handler is not None:
                self._handler = handler
                return
        if (
            (path == _PREFIX or path.startswith(_PREFIX + b"/"))
            and b"%" not in path
            and b"/." not in path
        ):
            self._handler = self._ext_authz
            return
        self._handler = None
        raise _HandOff

    def on_header(self, name: bytes, value: bytes) -> None:
        server = self._server
        lower = name.lower()
        # aiohttp's parser measures a name with the name before it, and the first
        # header's value with its name, against max_field_size: a head near the limit is
        # aiohttp's to take or refuse (what it measures of a later value, too).
        near = self._last_name + len(name) + len(value) > server.max_field_size
        self._last_name = len(name)
        if (
            near
            or not name.isascii()
            or not value.isascii()
            or lower in _HANDED_OFF_HEADERS
            or len(self._headers) >= server.max_headers
            # aiohttp's 413 reads and drops the rest for a while
            or (lower == b"content-length" and int(value) > server.max_body)
        ):
            raise _HandOff
        if lower in _SINGLETONS:
            if lower in self._singletons:
                raise _HandOff  # aiohttp's 400 for the header given twice
            self._singletons.add(lower)
        # llhttp strips the blanks before a value, not those after it; aiohttp strips both.
        self._headers.append((name.decode(), value.rstrip(b" \t").decode()))

    def on_headers_complete(self) -> None:
        if (
            self._handler is None
            or self._parser.get_http_version() != "1.1"
            or b"host" not in self._singletons  # aiohttp's 400 for HTTP/1.1 without Host
        ):
            raise _HandOff

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed += 1
        handler = self._handler
        assert handler is not None
        url = self._url.decode("latin-1")
        self._url = b""
        path = url.partition("?")[0]
        body = b"".join(self._body) if self._body else b""
        proxied = handler is self._ext_authz
        request = FastRequest(
            self._app,
            self._parser.get_method().decode(),
            path,
            url,
            # Read only, as aiohttp's proxy of them (one object less per request).
            CIMultiDict(self._headers),
            body,
            self._parser.should_keep_alive(),
            MatchInfo(self._app) if proxied else self._post_match,
            self._transport,
        )
        if proxied and len(path) > len(proxy.PREFIX):
            request.match_info["tail"] = path[len(proxy.PREFIX) + 1 :]
        self._queue.append((request, handler))
        self._server.served += 1
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        elif len(self._queue) >= _MAX_QUEUED and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    # -- answering
    async def _serve(self) -> None:
        queue = self._queue
        prepare = self._app.on_response_prepare
        last = False  # an answer after which the connection closes was written
        while queue:
            request, handler = queue.popleft()
            response: web.StreamResponse | bytes | native.Headed
            try:
                response = await handler(cast(web.Request, request))
            except Exception as exc:  # what aiohttp answers to an escaped exception
                log.exception("error handling %s %s", request.method, request.path, exc_info=exc)
                response = _internal_error()
            if undelivered.gone(self._transport):
                undelivered.take_back(request)  # reset while it was decided: nobody is told
            if isinstance(response, (bytes, native.Headed)):
                body, own = (response, None) if isinstance(response, bytes) else response
                transport = self._transport
                if (
                    transport is not None
                    and request.keep_alive
                    and not self._closing
                    and not prepare
                ):
                    # The usual answer: its head built here, not by a web.Response.
                    date = rfc822_formatted_time().encode()
                    fields = _header_lines(own) if own else b""
                    transport.write(_HEAD_200_JSON % (fields, len(body), date, body))
                    if self._eof and undelivered.holds(request):
                        # After the client's FIN: half-closed, or closed for good?
                        await undelivered.confirm(transport, request)
                    if self._paused and len(queue) < _MAX_QUEUED // 2:
                        self._resume_reading()
                    continue
                response = web.Response(body=body, content_type="application/json")
                if own:
                    response.headers.update(own)
            assert isinstance(response, web.StreamResponse)
            if prepare:
                await self._app.on_response_prepare.send(cast(web.Request, request), response)
            keep_alive = self._write(request, response)
            if self._eof and undelivered.holds(request) and self._transport is not None:
                await undelivered.confirm(self._transport, request)
            if not keep_alive:
                queue.clear()
                last = True
                break
            if self._paused and len(queue) < _MAX_QUEUED // 2 and self._transport is not None:
                self._resume_reading()
        self._task = None
        self._idle_since = self._loop.time()
        if self._transport is None:
            return
        if self._transport.is_closing() or last:
            # Closed after its last answer (`Connection: close`, a 500; after the client's
            # FIN, _write left that to here): what came after it is not read by anyone,
            # as aiohttp does not either.
            self._pending = None
            self._transport.close()
        elif self._pending is not None:
            self._give_to_aiohttp()
        elif self._eof or self._closing:
            self._transport.close()

    def _resume_reading(self) -> None:
        """The queue has room again: read on, unless the client does not read its answers
        or the bytes that wait for aiohttp fill their bound."""
        self._paused = False
        if not self._write_paused and not self._pending_full and self._transport is not None:
            self._transport.resume_reading()

    def _write(self, request: FastRequest, response: web.StreamResponse) -> bool:
        """Send `response` as aiohttp would; False when the connection closes after it."""
        transport = self._transport
        if transport is None:
            return False
        if not isinstance(response, web.Response) or not isinstance(
            response.body, (bytes, type(None))
        ):
            log.error("the fast path sends a web.Response with bytes, not %r", response)
            response = _internal_error()
        body = response.body if isinstance(response.body, bytes) else b""
        status = response.status
        headers = response.headers
        method = request.method
        empty = must_be_empty_body(method, status)
        if hdrs.CONTENT_LENGTH not in headers and (
            body or (status != 304 and method != hdrs.METH_HEAD)
        ):
            headers[hdrs.CONTENT_LENGTH] = str(len(body))
        if empty:
            if status in (204, 304) or 100 <= status < 200:
                headers.popall(hdrs.CONTENT_LENGTH, None)
        elif len(body) != 0:
            headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
        keep_alive = response.keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        keep_alive = keep_alive and not self._closing
        if not keep_alive and hdrs.CONNECTION not in headers:
            headers[hdrs.CONNECTION] = "close"
        head = _serialize_headers(f"HTTP/1.1 {status} {response.reason}", headers)
        transport.write(head + body if body and not empty else head)
        if not keep_alive and not self._eof:
            transport.close()  # (after the client's FIN, _serve closes once it confirmed)
        return keep_alive

    def _check_idle(self) -> None:
        """aiohttp's keep-alive timeout: close a connection idle (or silent since it
        opened, or trickling a head) that long; a read that ended inside a request has
        already gone to aiohttp, whose own timers then run."""
        self._keepalive = None
        if self._transport is None or self._pending is not None:
            return
        timeout = self._server.keepalive_timeout
        now = self._loop.time()
        if self._task is None and now >= self._idle_since + timeout:
            self._transport.close()
            return
        at = max(now, self._idle_since) + timeout
        self._keepalive = self._loop.call_at(at, self._check_idle)

    # -- handing a connection to aiohttp
    def _hand_off(self, data: bytes) -> None:
        """From the request being parsed on, the connection is aiohttp's: its bytes start
        after the requests of `data` already complete (queued here, answered first)."""
        start = 0 if self._completed == 0 else _end_of_requests(data, self._completed)
        self._pending = []
        self._pending_size = 0
        self._wait_for_aiohttp(data[start:])
        if self._task is None:
            self._give_to_aiohttp()

    def _wait_for_aiohttp(self, data: bytes) -> None:
        """Keep `data` for aiohttp, which takes the connection once the requests queued
        here are answered; past _MAX_PENDING bytes, stop reading until then (the client's
        TCP window closes), so a client cannot make the wait hold what it likes while a
        decision is in Redis."""
        assert self._pending is not None
        self._pending.append(data)
        self._pending_size += len(data)
        if (
            self._pending_size >= _MAX_PENDING
            and not self._pending_full
            and self._task is not None
            and self._transport is not None
        ):
            self._pending_full = True
            self._transport.pause_reading()

    def _unqueue(self, count: int) -> None:
        """Take back the last `count` requests queued (not started: this read's)."""
        for _ in range(count):
            self._queue.pop()
        self._server.served -= count

    def _give_to_aiohttp(self) -> None:
        transport = self._transport
        assert transport is not None and self._pending is not None
        data = b"".join(self._pending)
        self._server._connections.pop(cast(RequestHandler, self), None)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._closing:
            transport.close()
            return
        self._server.handed_off += 1
        protocol = self._server.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused or self._write_paused or self._pending_full:
            # aiohttp's protocol does its own flow control from here on.
            self._paused = self._write_paused = self._pending_full = False
            transport.resume_reading()
        if data:
            protocol.data_received(data)
        # The client's FIN came after these bytes: tell aiohttp's protocol (the sidecar's
        # keeps the transport open for the answers of whole requests), and do what the
        # transport does when it does not.
        eof_received = cast(asyncio.Protocol, protocol).eof_received
        if self._eof and not transport.is_closing() and not eof_received():
            transport.close()


class _Counter:
    def __init__(self) -> None:
        self.completed = 0

    def on_message_complete(self) -> None:
        self.completed += 1


def _end_of_requests(data: bytes, count: int) -> int:
    """The offset in `data` just after its first `count` requests (all of them parsed
    whole already). Byte by byte: only a read that mixes served requests with one for
    aiohttp comes here."""
    counter = _Counter()
    parser = httptools.HttpRequestParser(counter)
    view = memoryview(data)
    for i in range(len(data)):
        parser.feed_data(view[i : i + 1])
        if counter.completed == count:
            return i + 1
    return len(data)
