"""RFC 9457 problem details: every error answer is `application/problem+json` naming what
went wrong (and, for bad input, the field). Never a stack trace."""

from __future__ import annotations

from http import HTTPStatus

import msgspec
from aiohttp import web

from sidecar.config import split_validation_error

CONTENT_TYPE = "application/problem+json"


class Problem(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str
    field: str | None = None
    request_id: str | None = None
    degraded: bool | None = None


_encode = msgspec.json.Encoder().encode


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        degraded: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.degraded = degraded
        self.headers = headers or {}


def response(err: ProblemError, request_id: str | None = None) -> web.Response:
    phrase = HTTPStatus(err.status).phrase
    body = Problem(
        type=f"https://budget-sidecar.dev/problems/{phrase.lower().replace(' ', '-')}",
        title=phrase,
        status=err.status,
        detail=err.detail,
        field=err.field,
        request_id=request_id,
        degraded=err.degraded,
    )
    return web.Response(
        status=err.status,
        body=_encode(body),
        content_type=CONTENT_TYPE,
        headers=err.headers,
    )


def from_decode_error(exc: msgspec.DecodeError) -> ProblemError:
    """A body that is not valid JSON, or valid JSON that the schema rejects."""
    if isinstance(exc, msgspec.ValidationError):
        path, message = split_validation_error(str(exc))
        field = path[2:] if path.startswith("$.") else "body"
        return ProblemError(400, f"{field}: {message}", field=field)
    return ProblemError(400, f"body: not valid JSON ({exc})", field="body")
