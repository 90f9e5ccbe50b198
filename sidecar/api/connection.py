"""aiohttp's connection protocol, with what the sidecar changes about it:

- **What aiohttp answers on its own** (a request line or head its parser refuses, a body
  whose framing is broken, an exception that escapes the middlewares) is problem+json like
  every other error answer (sidecar.api.problems), naming what was wrong in `field`, with
  the X-Request-ID the other answers carry when request ids are on. aiohttp builds those
  answers in `RequestHandler.handle_error` (text/plain, no hook for an application:
  aio-libs/aiohttp#3287 is still open), so that method is overridden here, on a subclass
  that the sidecar's Server creates: the middlewares never see these requests.
- **A client that half-closes** (shuts down its sending side after its request, as curl
  and some proxies do) gets its answers, then the connection closes: aiohttp's
  `eof_received` lets the transport close at once, so the answer of a request it was
  deciding was lost (and its hold taken back). The fast path (sidecar.api.fast) does the
  same. A client that closed for good sends the same FIN; its kernel answers the answer
  with a reset, which `undelivered.confirm` waits for to take the hold back.

- **A bound on connections** (`settings.max_connections`, and never more than the
  process's descriptor limit leaves beside RESERVED_FDS for Redis, the config file and
  logs): a connection past it makes room by closing the idle connection open longest (one
  between requests, or that has not sent a whole head), as nginx reuses its keep-alive
  connections; when every one is in a request, the new one is closed unanswered. So
  neither idle connections nor a flood of them can take the memory (about 6.6 KB each)
  or the descriptors the Redis connection needs to be made again.

`SidecarApplication` is the application class for `fast_http: false`; the fast path's
`FastApplication` derives from it, and its hand-offs start this protocol too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from sidecar import logs
from sidecar.api import undelivered
from sidecar.api.problems import ProblemError, response

# llhttp's reason (the message's first line) -> the field it names. The reasons are
# llhttp's own strings; aiohttp adds its own for what its callbacks refuse.
_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), field)
    for pattern, field in (
        (r"transfer-encoding", "Transfer-Encoding"),
        (r"content-length", "Content-Length"),
        (r"chunk", "body"),
        (r"'host' header", "Host"),
        (r"too many headers", "headers"),
        (r"version", "http_version"),
        (r"header|CR|LF", "headers"),
        (r"url", "request_target"),
    )
)
# What an excerpt of a header line names (llhttp quotes the line it stopped in).
_HEADER_LINE = re.compile(r"b'([!#$%&'*+.^_`|~0-9A-Za-z-]+):")


def refused(exc: BaseException | None, max_line_size: int) -> tuple[str, str]:
    """(field, detail) for what aiohttp's parser refused: the part of the request line or
    head that was bad, and llhttp's (or aiohttp's) reason, on one line."""
    message = getattr(exc, "message", "") or str(exc or "")
    if message.startswith("Bad status line:\n"):
        # "Bad status line:\n  <reason>:\n\n  b'<excerpt>'\n  ^"
        message = message.partition("\n")[2].strip()
    reason = message.partition(":\n")[0].strip().rstrip(".") or "not valid HTTP/1.1"
    if "PRI/Upgrade" in reason:  # llhttp's words for the HTTP/2 connection preface
        field, reason = "http_version", "HTTP/2 is not served without an upgrade; use HTTP/1.1"
    elif isinstance(exc, http_exceptions.BadHttpMethod):
        field = "method"
    elif isinstance(exc, http_exceptions.InvalidURLError):
        field = "request_target"
    elif isinstance(exc, http_exceptions.LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        field = "request_target" if limit == max_line_size else "headers"
        reason = f"longer than {limit} bytes"
    elif isinstance(exc, http_exceptions.InvalidHeader):
        field = str(exc.hdr)  # (an istr)
    elif isinstance(exc, http_exceptions.ContentEncodingError):
        field = "Content-Encoding"
    elif isinstance(exc, http_exceptions.BadStatusLine):
        field = "http_version" if "version" in reason.lower() else "request_line"
    else:
        field = next((f for pattern, f in _REASONS if pattern.search(reason)), "request")
        if field == "headers":
            named = _HEADER_LINE.search(message)
            if named is not None and "value" in reason.lower():
                field = named.group(1)  # a header whose name parsed, its value not
    return field, f"{field}: {reason}"


log = logging.getLogger("sidecar.http")

# Descriptors kept from connections: the Redis connections (one for decisions, a pool for
# the rest), the config file and its reloads, the embedded server's socket, logs.
RESERVED_FDS = 64
# settings.max_connections, read per connection (a reload changes it).
MAX_CONNECTIONS: web.AppKey[Callable[[], int]] = web.AppKey("max_connections")
_LOG_EVERY_S = 10.0


def descriptor_bound() -> int | None:
    """The most connections the descriptor limit (RLIMIT_NOFILE, soft) leaves room for,
    RESERVED_FDS kept; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - RESERVED_FDS, 1)


class SidecarRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection; see the module's docstring."""

    __slots__ = ("_half_closed",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._half_closed = False

    def idle(self) -> bool:
        """Between requests (or before a whole first head): what aiohttp's keep-alive
        timer would close."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own answer, as problem+json: a 5xx logged as aiohttp does, a 400 (the
        client's) in one throttled line (_Malformed); refused when an answer was already
        started."""
        request_id = uuid.uuid4().hex if _request_ids(self) else None
        if status < 500:
            # The client's malformed request, answered 400 naming what was wrong: one line
            # without a traceback (aiohttp logs 1.5 KB of one at ERROR for each), at most
            # one each MALFORMED_LOG_EVERY_S, so that a flood of them cannot fill a disk.
            if request.writer.output_size > 0:
                raise ConnectionError("an answer was started already: no other can be sent")
            _MALFORMED.note(request.remote, exc)
        else:
            token = logs.REQUEST_ID.set(request_id)
            try:
                super().handle_error(request, status, exc, message)  # logs; may raise
            finally:
                logs.REQUEST_ID.reset(token)
        if status == 400:
            try:
                field, detail = refused(exc, self.max_line_size)
            except Exception:  # (a message of a shape not seen before: still an answer)
                field, detail = "request", "request: not valid HTTP/1.1"
            problem = ProblemError(400, detail, field=field)
        elif status == 504:
            problem = ProblemError(504, "the request was not answered in time")
        else:  # 500: never the exception's text (it is in the log, with the request id)
            problem = ProblemError(status, "internal error")
        resp = response(problem, request_id if status >= 500 else None)
        if request_id is not None:
            resp.headers["X-Request-ID"] = request_id
        resp.force_close()  # as aiohttp's: what follows a refused head is not read
        return resp

    # asyncio.Protocol.eof_received may return True (keep the transport open); aiohttp's
    # annotation says None because its own never does.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client shut down its sending side: when every request it sent is whole and
        some are not answered yet, keep the transport open for their answers (True), and
        close after the last (`finish_response`); otherwise close now, as aiohttp does."""
        pending = [payload for _, payload in self._messages]
        current = self._current_request
        if current is not None:
            pending.append(current.content)
        if (self._request_in_progress or self._messages) and all(p.is_eof() for p in pending):
            self._half_closed = True
            return True
        return None

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._half_closed:
            transport = self.transport
            if transport is not None and undelivered.HELD in request:
                await undelivered.confirm(transport, request)
            if not self._messages:
                self.close()  # the last answer written: start() closes the transport
        return result


MALFORMED_LOG_EVERY_S = 10.0


class _Malformed:
    """The log of malformed requests: the first one, then at most one a period, saying
    how many came in between."""

    def __init__(self) -> None:
        self.logged_at: float | None = None
        self.since = 0  # malformed requests not logged since the last line

    def note(self, remote: str | None, exc: BaseException | None) -> None:
        now = time.monotonic()
        if self.logged_at is not None and now - self.logged_at < MALFORMED_LOG_EVERY_S:
            self.since += 1
            return
        more = f" ({self.since} more since the last line)" if self.since else ""
        first = str(exc or "").strip().splitlines()
        log.warning(
            "refused a malformed request from %s: %s%s",
            remote,
            " ".join(first[:2])[:200] if first else "not valid HTTP/1.1",
            more,
        )
        self.logged_at, self.since = now, 0


_MALFORMED = _Malformed()


def _request_ids(handler: RequestHandler) -> bool:
    """Whether answers carry X-Request-ID (the request-id middleware is on)."""
    manager = handler._manager
    return isinstance(manager, SidecarServer) and manager.request_ids


class SidecarServer(web.Server):
    """aiohttp's Server whose connections run SidecarRequestHandler, at most
    `max_connections()` of them (see the module's docstring). Made from the Server aiohttp
    built (same handler, kwargs and connection registry), by `adopt`."""

    request_ids: bool
    max_connections: Callable[[], int] | None
    descriptor_bound: int | None
    # The open connections by transport, oldest first: a fast-path connection handed to
    # aiohttp keeps its place (the same transport, another protocol).
    open: dict[asyncio.Transport, Any]
    evicted: int  # idle connections closed to make room
    refused: int  # new connections closed unanswered (every open one in a request)
    _logged_at: float

    @classmethod
    def adopt(cls, server: web.Server, app: web.Application) -> SidecarServer:
        adopted = cls.__new__(cls)
        adopted.__dict__.update(server.__dict__)
        adopted.request_ids = logs.request_ids in app.middlewares
        adopted.max_connections = app.get(MAX_CONNECTIONS)
        adopted.descriptor_bound = descriptor_bound()
        adopted.open = {}
        adopted.evicted = adopted.refused = 0
        adopted._logged_at = -_LOG_EVERY_S
        return adopted

    def __call__(self) -> RequestHandler:
        return SidecarRequestHandler(self, loop=self._loop, **self._kwargs)

    def bound(self) -> int | None:
        configured = self.max_connections() if self.max_connections is not None else None
        if configured is None or self.descriptor_bound is None:
            return configured if configured is not None else self.descriptor_bound
        return min(configured, self.descriptor_bound)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        handed_off = transport in self.open
        self.open[transport] = handler
        if handed_off:
            return
        bound = self.bound()
        if bound is not None and len(self.open) > bound:
            self._make_room(transport, bound)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        transport = self._connections.get(handler) or getattr(handler, "transport", None)
        super().connection_lost(handler, exc)
        if transport is not None and self.open.get(transport) is handler:
            del self.open[transport]

    def _make_room(self, new: asyncio.Transport, bound: int) -> None:
        """Close the idle connections open longest until `bound` holds with `new` (one,
        unless a reload lowered the bound below those open: then as many as it takes, so
        the lowered bound holds from the next connection on), and `new` itself too if too
        few are idle for that."""
        victims: list[asyncio.Transport] = []
        excess = len(self.open) - bound
        for transport, handler in self.open.items():
            if len(victims) == excess:
                break
            if transport is new or transport.is_closing():
                continue
            idle = getattr(handler, "idle", None)
            if idle is not None and idle():
                victims.append(transport)
        self.evicted += len(victims)
        what = (
            "closed the idle connection open longest to make room"
            if len(victims) == 1
            else f"closed the {len(victims)} idle connections open longest to make room"
        )
        if len(victims) < excess:
            # Too few idle ones to close (every other one is in a request): over the bound
            # still, so the new one goes too, unanswered.
            victims.append(new)
            self.refused += 1
            what = "every one is in a request: closed the new one unanswered" + (
                f" (and {len(victims) - 1} idle ones)" if len(victims) > 1 else ""
            )
        for victim in victims:
            del self.open[victim]  # (its connection_lost comes on a later turn of the loop)
            victim.close()
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "%d connections open, the most allowed (settings.max_connections, or what "
                "RLIMIT_NOFILE leaves): %s (%d idle closed, %d refused so far)",
                bound,
                what,
                self.evicted,
                self.refused,
            )


with warnings.catch_warnings():
    # aiohttp discourages subclassing Application; this one only changes the protocol its
    # Server starts connections on, so TestServer and AppRunner both get it.
    warnings.simplefilter("ignore", DeprecationWarning)

    class SidecarApplication(web.Application):
        __slots__ = ()

        def _make_handler(self, **kwargs: Any) -> web.Server:
            return SidecarServer.adopt(super()._make_handler(**kwargs), self)
