"""A client removed from the config by a reload is refused at once, however the config
objects lie in memory. The credentials cache was keyed by id() of the config it was built
from, and kept no reference to it: once that config was freed, a later config allocated
at its address (CPython reuses freed memory for objects of the same size at once) read as
the cached one, and the removed client's credentials still let it in."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar.api.auth import PRINCIPAL, authenticator
from sidecar.api.problems import ProblemError
from sidecar.auth import Client, Role
from sidecar.engine import Engine

KEY = web.AppKey("engine", Engine)


class Cfg:
    """What the authenticator reads of a Config: its clients (one object size for all)."""

    __slots__ = ("clients",)

    def __init__(self, *ids: str) -> None:
        self.clients = tuple(Client(i, "t", Role.ADMIN, None) for i in ids)


class Holder:
    config: Any = None


def call(app: web.Application, check: Any, client_id: str) -> Client:
    token = base64.b64encode(f"{client_id}:x".encode()).decode()
    request = make_mocked_request(
        "GET", "/v1/stops", headers={"Authorization": f"Basic {token}"}, app=app
    )
    check(request)
    principal: Client = request[PRINCIPAL]
    return principal


def test_a_client_removed_by_two_reloads_is_refused() -> None:
    app, check, holder = web.Application(), authenticator(KEY), Holder()
    app[KEY] = holder  # type: ignore[assignment]  # only .config is read
    holder.config = Cfg("revoked", "ops")
    assert call(app, check, "revoked").client_id == "revoked"
    # Two reloads with no request between: the first config is freed after the first
    # swap; the third is allocated while the second is in force, in the freed memory.
    holder.config = Cfg("ops")
    holder.config = Cfg("ops")
    # (Before the fix the third config had the first's id() here, on CPython every time,
    # and the cached clients of the first were used: "revoked" got in.)
    with pytest.raises(ProblemError) as refused:
        call(app, check, "revoked")
    assert refused.value.status == 401
    assert call(app, check, "ops").client_id == "ops"
