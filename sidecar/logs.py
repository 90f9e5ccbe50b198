"""Structured logs: one JSON object per line, with the request id when there is one.

The request id comes from the X-Request-ID header (a proxy's or the agent's), or is made
up; it is echoed in the response. The middleware that sets it is installed only when
debug logging is on, so the hot path pays nothing for it otherwise; error logs of the
problem middleware carry their own request id either way.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from sidecar.schemas import Decision

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
decision_log = logging.getLogger("sidecar.decision")

# Attributes every LogRecord has; anything else was passed with extra= and is logged.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "request_id"?, extra fields..., "exc"?}."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def setup(level: str = "info", stream: Any = None) -> None:
    """JSON lines on stderr (or `stream`) for every logger, at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would be a second line per request; decisions have their own.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind the request id for the logs of this request and echo it in the response."""
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    token = REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    finally:
        REQUEST_ID.reset(token)
    response.headers.setdefault("X-Request-ID", request_id)
    return response


def request_id_of(request: web.Request) -> str:
    """The bound request id, else the client's X-Request-ID, else a new one."""
    return REQUEST_ID.get() or request.headers.get("X-Request-ID") or uuid.uuid4().hex


def debug_enabled() -> bool:
    return decision_log.isEnabledFor(logging.DEBUG)


def log_decision(operation: str, decision: Decision, seconds: float) -> None:
    """One debug line per decision; callers check debug_enabled() first."""
    info = decision.budget_info
    decision_log.debug(
        "decision",
        extra={
            "operation": operation,
            "allowed": decision.allowed,
            "action": decision.action,
            "degraded": decision.degraded,
            "replayed": decision.replayed,
            "reservation_id": decision.reservation_id,
            "estimated_usd": decision.estimated_usd,
            "budget_id": info.budget_id if info is not None else None,
            "percentage": info.percentage if info is not None else None,
            "duration_ms": round(seconds * 1000, 3),
        },
    )
