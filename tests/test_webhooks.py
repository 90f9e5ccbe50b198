"""Threshold-alert webhooks (sidecar/webhooks.py), against real processes: a receiver
started here sees every alert exactly once per period however many concurrent calls
cross it on however many replicas, again after answering 500 the first time, once it
comes up after being down, and only its tenant's alerts when it names one. In-process
tests pin the signature and headers, the takeover of a dead consumer's alerts, the
renewal of a long retry's claim, and a loop that survives Redis being away.

Waits poll with a generous deadline and then assert exact counts: nothing here is timed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict

from sidecar import config as config_mod
from sidecar import keys
from sidecar.config import ConfigError
from sidecar.model import Webhook
from sidecar.periods import iso
from sidecar.webhooks import WebhookDeliverer, signature
from tests.harness import RedisServer, SidecarProcess, collect_dead_sockets, free_port

SECRET = "whsec-0123456789abcdef0123456789"  # 32 characters
BUDGET: dict[str, Any] = {
    "id": "team-cap", "name": "Team cap", "scope": "team", "scope_id": "t1",
    "limit_usd": 1.0, "period": "monthly", "alert_thresholds": [50, 80, 100],
}  # fmt: skip
GROUP = "webhook:ops"
# Plenty for a delivery (or a retry after a 500) to arrive; the waits end as soon as it has.
DEADLINE_S = 30.0
# After the expected deliveries, how long to keep watching that no more arrive.
QUIET_S = 2.0

WriteConfig = Callable[..., Path]


# -- a webhook receiver ---------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    status: int

    @property
    def alert(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    @property
    def alert_id(self) -> str:
        return self.headers["X-Budget-Alert-Id"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST. mode "ok" answers 200,
    "fail_first" answers 500 to the first delivery of each alert id and 200 afterwards,
    "fail" answers 500 to everything."""

    def __init__(self, mode: str = "ok", port: int | None = None) -> None:
        self.mode = mode
        self.port = port or free_port()
        self.deliveries: list[Delivery] = []
        self._seen: set[tuple[str, str]] = set()
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = (request.path, request.headers.get("X-Budget-Alert-Id", ""))
        if self.mode == "fail" or (self.mode == "fail_first" and key not in self._seen):
            status = 500
        else:
            status = 200
        self._seen.add(key)
        self.deliveries.append(Delivery(request.path, request.headers.copy(), body, status))
        return web.Response(status=status)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def on(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    def acked(self, path: str = "/hook") -> set[tuple[str, str]]:
        """(tenant, alert id) of the deliveries answered 2xx."""
        return {(d.alert["tenant_id"], d.alert_id) for d in self.on(path) if d.status == 200}


@pytest.fixture(autouse=True)
def no_stray_sockets() -> Iterator[None]:
    """RedisServer.start() polls with clients it never closes; their sockets would raise
    ResourceWarning in whichever later test a garbage collection happens to run."""
    collect_dead_sockets()
    yield
    collect_dead_sockets()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.stop()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait (without blocking the receiver) until predicate() holds, up to DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {DEADLINE_S}s")
        await asyncio.sleep(0.05)


def verify(d: Delivery, secret: str = SECRET) -> None:
    """What a receiver checks: the signature over the raw body, the id in both places."""
    expected = "sha256=" + hmac.new(secret.encode(), d.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(d.headers["X-Budget-Signature-256"], expected)
    assert d.headers["Content-Type"] == "application/json"
    assert d.alert["id"] == d.alert_id


def pending(client: redis.Redis, tenant: str, group: str = GROUP) -> int:
    """Alerts taken by `group` and not acknowledged; 0 before the sidecar has made the
    group (it does so in the background once serving: a loaded machine can be slower)."""
    try:
        summary: dict[str, Any] = client.xpending(keys.tenant_keys(tenant).alerts, group)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return 0
    return int(summary["pending"])


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for p in started:
        p.cleanup()


# -- through real sidecar processes ---------------------------------------------------------


@pytest.mark.slow
async def test_every_alert_once_per_period_from_two_replicas_after_a_500(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: WriteConfig,
    processes: list[SidecarProcess],
) -> None:
    """The acceptance test: 100 concurrent crossing calls on two replicas, a receiver that
    answers 500 the first time: each threshold's alert arrives once, retried once."""
    receiver = await Receiver("fail_first").start()
    try:
        path = write_config(
            {
                "budgets": [BUDGET],
                "webhooks": [{"name": "ops", "url": receiver.url(), "secret": SECRET}],
            }
        )
        for _ in range(2):
            processes.append(SidecarProcess(redis_server.url, str(path)).start())

        async with aiohttp.ClientSession() as http:

            async def record(i: int) -> int:
                url = processes[i % 2].url + "/v1/record"
                async with http.post(url, json={"team_id": "t1", "cost_usd": 0.01}) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(record(i) for i in range(100)))
            assert statuses == [200] * 100

            await eventually(lambda: len(receiver.acked()) == 3, "three alerts acknowledged")
            await asyncio.sleep(QUIET_S)

            by_id: dict[str, list[Delivery]] = {}
            for d in receiver.deliveries:
                by_id.setdefault(d.alert_id, []).append(d)
            assert len(by_id) == 3
            for alert_id, ds in by_id.items():
                assert [d.status for d in ds] == [500, 200], alert_id
                assert [d.headers["X-Budget-Delivery"] for d in ds] == ["1", "2"], alert_id
                assert ds[0].body == ds[1].body  # the retry is the same alert
                for d in ds:
                    verify(d)
            sent = [ds[1].alert for ds in by_id.values()]
            assert sorted(a["threshold"] for a in sent) == [50, 80, 100]
            tenant = sent[0]["tenant_id"]
            for a in sent:
                assert a["budget_id"] == "team-cap"
                assert a["alert_type"] == "threshold_reached"
                assert a["entity"] == "t1"
                assert a["tenant_id"] == tenant
                assert a["limit_usd"] == 1.0
                assert a["message"].startswith("Budget 'Team cap' ")
            assert pending(redis_client, tenant) == 0  # every alert acknowledged

            # The alerts the API lists are the ones delivered.
            async with http.get(processes[0].url + "/api/v1/budgets/team-cap/alerts") as resp:
                assert resp.status == 200, await resp.text()
                listed = (await resp.json())["alerts"]
                assert {a["id"] for a in listed} == set(by_id)

            # Each replica counted its own attempts; together: 3 failed, 3 delivered.
            counted = {"delivered": 0.0, "failed": 0.0}
            for proc in processes:
                async with http.get(proc.url + "/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        for result in counted:
                            if line.startswith(f'budget_sidecar_alerts_total{{result="{result}"}}'):
                                counted[result] += float(line.split()[-1])
            assert counted == {"delivered": 3.0, "failed": 3.0}
    finally:
        await receiver.stop()


@pytest.mark.slow
async def test_receiver_down_at_first_gets_the_alerts_when_it_comes_up(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: WriteConfig,
    processes: list[SidecarProcess],
) -> None:
    receiver = Receiver()  # its port is closed until start()
    try:
        path = write_config(
            {
                "budgets": [BUDGET],
                "webhooks": [{"name": "ops", "url": receiver.url(), "secret": SECRET}],
            }
        )
        sidecar = SidecarProcess(redis_server.url, str(path)).start()
        processes.append(sidecar)
        async with aiohttp.ClientSession() as http:
            body = {"team_id": "t1", "cost_usd": 1.0}
            async with http.post(sidecar.url + "/v1/record", json=body) as resp:
                assert resp.status == 200, await resp.text()
        # The three alerts are taken for delivery and their first attempts fail.
        await eventually(lambda: pending(redis_client, "default") == 3, "alerts pending")
        await eventually(
            lambda: sidecar.output().count("webhook unreachable") >= 3, "failed attempts"
        )
        await receiver.start()
        await eventually(lambda: len(receiver.acked()) == 3, "three alerts delivered")
        await asyncio.sleep(QUIET_S)
        assert len(receiver.deliveries) == 3
        for d in receiver.deliveries:
            verify(d)
            assert int(d.headers["X-Budget-Delivery"]) >= 2  # delivered by a retry
        assert sorted(d.alert["threshold"] for d in receiver.deliveries) == [50, 80, 100]
        assert pending(redis_client, "default") == 0
    finally:
        await receiver.stop()


@pytest.mark.slow
async def test_a_tenants_webhook_receives_only_that_tenants_alerts(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: WriteConfig,
    processes: list[SidecarProcess],
    receiver: Receiver,
) -> None:
    await receiver.start()
    path = write_config(
        {
            "budgets": [BUDGET],
            "auth": {
                "clients": [
                    {"client_id": "a", "secret": "secret-a-123", "role": "admin", "tenant": "ta"},
                    {"client_id": "b", "secret": "secret-b-123", "role": "admin", "tenant": "tb"},
                ]
            },
            "webhooks": [
                {"name": "all", "url": receiver.url("/all"), "secret": SECRET},
                {"name": "ta-only", "url": receiver.url("/ta"), "secret": SECRET[::-1],
                 "tenant": "ta"},
            ],
        }
    )  # fmt: skip
    sidecar = SidecarProcess(redis_server.url, str(path)).start()
    processes.append(sidecar)
    async with aiohttp.ClientSession() as http:
        for client_id in ("a", "b"):
            token = base64.b64encode(f"{client_id}:secret-{client_id}-123".encode()).decode()
            auth = {"Authorization": f"Basic {token}"}
            body = {"team_id": "t1", "cost_usd": 1.0}
            async with http.post(sidecar.url + "/v1/record", json=body, headers=auth) as resp:
                assert resp.status == 200, await resp.text()

    await eventually(lambda: len(receiver.acked("/all")) == 6, "both tenants' alerts on /all")
    await eventually(lambda: len(receiver.acked("/ta")) == 3, "ta's alerts on /ta")
    await asyncio.sleep(QUIET_S)
    assert len(receiver.on("/all")) == 6 and len(receiver.on("/ta")) == 3
    assert {d.alert["tenant_id"] for d in receiver.on("/all")} == {"ta", "tb"}
    assert {d.alert["tenant_id"] for d in receiver.on("/ta")} == {"ta"}
    for d in receiver.on("/all"):
        verify(d)
    for d in receiver.on("/ta"):
        verify(d, SECRET[::-1])  # each webhook signs with its own secret
    assert pending(redis_client, "ta", "webhook:all") == 0
    assert pending(redis_client, "tb", "webhook:all") == 0
    assert pending(redis_client, "ta", "webhook:ta-only") == 0
    assert not redis_client.exists(keys.tenant_keys("tb").alerts) or not any(
        g["name"] == "webhook:ta-only"
        for g in redis_client.xinfo_groups(keys.tenant_keys("tb").alerts)
    )


# -- in process, over a real redis-server ---------------------------------------------------


def entry(budget_id: str = "team-cap", threshold: int = 50) -> dict[str, str]:
    """Stream fields as settle.lua/record.lua write them (see sidecar.alerts)."""
    cid = keys.counter_id(budget_id, "t1", "m202603")
    return {"cid": cid, "t": str(threshold), "l": "1000000", "u": "500000", "at": "1773144000000"}


@pytest.fixture
async def aclient(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Any]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    yield client
    await client.aclose()


def deliverer(
    client: Any, hooks: tuple[Webhook, ...], tenants: tuple[str, ...] = ("default",)
) -> WebhookDeliverer:
    d = WebhookDeliverer(client, lambda: hooks, lambda: tenants, lambda _t, _b: "Team cap")
    d.POLL_INTERVAL_S = 0.05
    d.BACKOFF_INITIAL_S = 0.05
    return d


async def test_headers_signature_and_body_of_one_delivery(
    aclient: Any, redis_client: redis.Redis, receiver: Receiver
) -> None:
    await receiver.start()
    stream = keys.tenant_keys("default").alerts
    redis_client.xadd(stream, entry())  # type: ignore[arg-type]
    redis_client.xadd(stream, {"junk": "1"})  # unreadable: acknowledged, not delivered
    hook = Webhook("ops", receiver.url(), SECRET.encode())
    run = deliverer(aclient, (hook,)).lifecycle()
    await anext(run)
    try:
        await eventually(lambda: len(receiver.deliveries) == 1, "one delivery")
        await eventually(lambda: pending(redis_client, "default") == 0, "both entries acked")
    finally:
        await anext(run, None)
    await asyncio.sleep(0.2)
    [d] = receiver.deliveries
    verify(d)
    assert d.headers["X-Budget-Signature-256"] == signature(SECRET.encode(), d.body)
    assert d.headers["X-Budget-Delivery"] == "1"
    assert d.alert == {
        "id": "default/" + keys.counter_id("team-cap", "t1", "m202603") + "/50",
        "budget_id": "team-cap",
        "alert_type": "threshold_reached",
        "threshold": 50,
        "percentage_reached": 50.0,
        "amount_usd": 0.5,
        "limit_usd": 1.0,
        "message": "Budget 'Team cap' 50% reached (t1)",
        "created_at": iso(1773144000000),
        "acknowledged": False,
        "entity": "t1",
        "tenant_id": "default",
    }
    # A clean shutdown removes this process's consumer, which holds nothing pending.
    assert redis_client.xinfo_consumers(keys.tenant_keys("default").alerts, GROUP) == []


async def test_a_dead_consumers_alerts_are_taken_over_and_trimmed_ones_dropped(
    aclient: Any, redis_client: redis.Redis, receiver: Receiver
) -> None:
    await receiver.start()
    stream = keys.tenant_keys("default").alerts
    redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    redis_client.xadd(stream, entry(threshold=50))  # type: ignore[arg-type]
    trimmed = redis_client.xadd(stream, entry(threshold=80))  # type: ignore[arg-type]
    # A replica reads both and dies; one entry is then trimmed from the stream.
    redis_client.xreadgroup(GROUP, "dead-replica", {stream: ">"}, count=10)
    redis_client.xdel(stream, trimmed)
    d = deliverer(aclient, (Webhook("ops", receiver.url(), SECRET.encode()),))
    d.CLAIM_IDLE_MS = 100
    d.CLAIM_INTERVAL_S = 0.05
    run = d.lifecycle()
    await anext(run)
    try:
        await eventually(lambda: pending(redis_client, "default") == 0, "nothing pending")
        await eventually(lambda: len(receiver.deliveries) == 1, "the kept alert delivered")
    finally:
        await anext(run, None)
    [delivery] = receiver.deliveries
    assert delivery.alert["threshold"] == 50 and delivery.status == 200


async def test_a_long_retry_keeps_its_claim_and_is_delivered_once(
    aclient: Any, redis_client: redis.Redis, receiver: Receiver
) -> None:
    """A delivery retrying for longer than the takeover idle time renews its claim, so
    another replica does not deliver the same alert alongside it."""
    receiver.mode = "fail"
    await receiver.start()
    stream = keys.tenant_keys("default").alerts
    redis_client.xadd(stream, entry())  # type: ignore[arg-type]
    hooks = (Webhook("ops", receiver.url(), SECRET.encode()),)
    owner = deliverer(aclient, hooks)
    owner.REFRESH_INTERVAL_S = 0.05
    owner.BACKOFF_MAX_S = 0.2
    other = deliverer(aclient, hooks)
    other.consumer = "other-replica"
    other.CLAIM_IDLE_MS = 1000
    other.CLAIM_INTERVAL_S = 0.05
    first = owner.lifecycle()
    await anext(first)
    second = other.lifecycle()
    try:
        await eventually(lambda: len(receiver.deliveries) >= 1, "a first attempt")
        await anext(second)
        # Well past the takeover idle time, still retrying.
        await asyncio.sleep(2.5)
        [info] = redis_client.xpending_range(stream, GROUP, "-", "+", 10)
        assert info["consumer"] == owner.consumer
        attempts = [int(d.headers["X-Budget-Delivery"]) for d in receiver.deliveries]
        assert attempts == list(range(1, len(attempts) + 1))  # one sender, counting up
        receiver.mode = "ok"
        await eventually(lambda: len(receiver.acked()) == 1, "delivered")
        await eventually(lambda: pending(redis_client, "default") == 0, "acknowledged")
    finally:
        await anext(second, None)
        await anext(first, None)
    assert [d.status for d in receiver.deliveries].count(200) == 1


async def test_the_loop_survives_redis_being_away_and_catches_up(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down at startup: a warning (one, not one per pass), no crash; once Redis is
    there, the alerts are delivered; shutdown is clean either way."""
    caplog.set_level(logging.INFO, "sidecar.webhooks")
    await receiver.start()
    server = RedisServer()  # its port stays closed until start()
    client = aioredis.Redis(
        host="127.0.0.1", port=server.port, decode_responses=True, socket_timeout=1
    )
    run = deliverer(client, (Webhook("ops", receiver.url(), SECRET.encode()),)).lifecycle()
    try:
        await anext(run)
        await eventually(lambda: "webhook delivery cannot reach Redis" in caplog.text, "warning")
        server.start()
        collect_dead_sockets()
        with server.client() as sync_client:
            sync_client.xadd(keys.tenant_keys("default").alerts, entry())
        await eventually(lambda: len(receiver.acked()) == 1, "delivered once Redis is back")
        await eventually(lambda: "reaches Redis again" in caplog.text, "recovery logged")
    finally:
        await anext(run, None)
        await client.aclose()
        server.cleanup()
    assert caplog.text.count("cannot reach Redis") == 1


async def test_shutdown_ends_wherever_it_interrupts_the_loop(
    redis_server: RedisServer, redis_client: redis.Redis, receiver: Receiver
) -> None:
    """With a socket timeout (as the sidecar's store sets one) redis-py sends through
    asyncio.wait_for, which on Python 3.11 can swallow a cancellation: shutdown must end
    anyway, wherever it lands."""
    await receiver.start()
    redis_client.xadd(keys.tenant_keys("default").alerts, entry())  # type: ignore[arg-type]
    client = aioredis.Redis(
        host="127.0.0.1", port=redis_server.port, decode_responses=True, socket_timeout=5
    )
    try:
        for i in range(30):
            d = deliverer(client, (Webhook("ops", receiver.url(), SECRET.encode()),))
            d.POLL_INTERVAL_S = 0  # back to back Redis calls: the cancel lands in one
            d.CLAIM_INTERVAL_S = 0
            d.CLAIM_IDLE_MS = 0
            run = d.lifecycle()
            await anext(run)
            await asyncio.sleep(0.002 * (i % 10))
            ended = asyncio.ensure_future(anext(run, None))
            done, _ = await asyncio.wait({ended}, timeout=DEADLINE_S)
            assert done, f"shutdown {i} did not end"
    finally:
        await client.aclose()


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secrets",
    [{}, {"secret": SECRET, "secret_env": "HOOK_SECRET"}],
    ids=["neither", "both"],
)
def test_a_webhook_needs_exactly_one_secret(secrets: dict[str, str]) -> None:
    doc = {"webhooks": [{"name": "ops", "url": "https://example.com/hook", **secrets}]}
    with pytest.raises(ConfigError) as err:
        config_mod.parse(doc, "<test>")
    assert err.value.path == "$.webhooks[0].secret"


def test_a_webhook_secret_from_an_unset_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BS_TEST_HOOK_SECRET", raising=False)
    doc = {"webhooks": [{"name": "ops", "url": "https://example.com/h", "secret_env":
                         "BS_TEST_HOOK_SECRET"}]}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config_mod.parse(doc, "<test>")
    assert err.value.path == "$.webhooks[0].secret_env"
    monkeypatch.setenv("BS_TEST_HOOK_SECRET", SECRET)
    [hook] = config_mod.parse(doc, "<test>").webhooks
    assert hook.secret == SECRET.encode() and hook.tenant is None and hook.timeout_ms == 5000
