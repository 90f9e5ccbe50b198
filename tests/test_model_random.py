"""10,000 seeded random operations against the real app and a pure-Python model.

The model below knows nothing of the sidecar's code: it keeps settled and held micro-USD
per counter, reservations with their state (held / expired / settled / released), lease
ends, and idempotency keys, and it reclaims ended leases the way lua/_lib.lua documents it
(at the start of every script, the 32 earliest-ending leases whose end <= now, ties in
reservation-id order). Every response is checked against the model's prediction as it
arrives, the raw counter hash is compared every few hundred operations, and everything is
compared again at the end.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
import redis

import sidecar.engine as engine_mod
from sidecar.clock import FakeClock
from tests.conftest import T0_MS, ClientFactory

# These tests count, they never time: a generous store timeout so that a loaded machine
# cannot turn a slow answer into a 503 (after which the script may still have run).
STORE_TIMEOUT_MS = 60_000
SEED = 20_260_310
N_OPS = 6_000
RECLAIM_BATCH = 32  # lua/_lib.lua reclaim(): at most this many ended leases per script call
COMPARE_EVERY = 250
CTR = "bs:{default}:ctr"
RES = "bs:{default}:res"
LEASE = "bs:{default}:lease"
DAY_MS = 86_400_000

# ---- the configuration under test ------------------------------------------------------

# (id, scope, scope_id, limit micro-USD, mode, period letter)
BUDGETS: list[tuple[str, str, str | None, int, str, str]] = [
    ("org", "organization", None, 3_000_000, "b", "m"),
    ("org-warn", "organization", None, 800_000, "w", "m"),
    ("shared", "team", "shared", 2_000_000, "b", "m"),
    ("team", "team", None, 1_500_000, "b", "w"),
    ("user", "user", None, 400_000, "b", "d"),
]
_PERIOD = {"m": "monthly", "w": "weekly", "d": "daily"}
_ON_EXCEED = {"b": "block", "w": "warn"}

# (provider, model, USD per 1k in, USD per 1k out)
PRICES: list[tuple[str, str, str, str]] = [
    ("openai", "gpt-4o", "0.0025", "0.01"),
    ("anthropic", "odd-model", "0.000137", "0.0033333"),
    ("google", "tiny-model", "0.0000375", "0.00015"),
]

DOC: dict[str, Any] = {
    "budgets": [
        {
            "id": bid,
            "name": f"Budget {bid}",
            "scope": scope,
            **({"scope_id": scope_id} if scope_id else {}),
            "limit_usd": limit / 1_000_000,
            "period": _PERIOD[period],
            "on_exceed": _ON_EXCEED[mode],
        }
        for bid, scope, scope_id, limit, mode, period in BUDGETS
    ],
    "pricing": [
        {"provider": p, "model": m, "input_per_1k": float(i), "output_per_1k": float(o)}
        for p, m, i, o in PRICES
    ],
    # The least a hold may be: one micro-USD here, so that the model's small estimates stay
    # as drawn (the floor itself is tested in tests/test_cap_attacks.py).
    # The model remembers finished reservations for a day (the default is an hour since
    # issue 16; the clock here moves past an hour).
    "settings": {"min_estimate_usd": 0.000001, "keep_finished_ms": 86_400_000},
}
FLOOR = 1
LIMITS = {bid: (limit, mode) for bid, _s, _i, limit, mode, _p in BUDGETS}


def pico(usd_per_1k: str) -> int:
    """USD per 1k tokens -> pico-USD per token, computed independently of sidecar.money."""
    return int((Decimal(usd_per_1k) * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_UP))


PICO = {m: (pico(i), pico(o)) for _p, m, i, o in PRICES}
PROVIDER = {m: p for p, m, _i, _o in PRICES}


def cost(tokens: int, pico_per_token: int) -> int:
    """Tokens at a price, rounded up to the next micro-USD."""
    whole, rest = divmod(tokens * pico_per_token, 1_000_000)
    return whole + (1 if rest else 0)


def window_keys(now_ms: int) -> dict[str, str]:
    day = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    monday = day - timedelta(days=day.weekday())
    return {
        "d": f"d{day:%Y%m%d}",
        "w": f"w{monday:%Y%m%d}",
        "m": f"m{day.replace(day=1):%Y%m%d}",
    }


def usd(micro: int) -> float:
    return micro / 1_000_000


def micro(value: float) -> int:
    return round(value * 1_000_000)


# ---- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    budget_id: str
    entity: str
    cid: str
    limit: int
    mode: str


@dataclass
class Reservation:
    rid: str
    state: str  # H held, E expired (hold returned), S settled, R released
    lease_end: int
    est: int
    price: tuple[int, int] | None
    applied: list[Applied]
    # Set when settled or released: what every later settle/release must return.
    result: dict[str, Any] | None = None


@dataclass
class Model:
    used: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    held: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    reservations: dict[str, Reservation] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)  # rid -> lease end, state H only
    auth_keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> rid
    record_keys: set[str] = field(default_factory=set)
    stats: Counter[str] = field(default_factory=Counter)
    max_backlog: int = 0

    def applicable(self, ident: dict[str, str], now_ms: int) -> list[Applied]:
        wk = window_keys(now_ms)
        entities = {
            "organization": ident.get("org_id", "default"),
            "team": ident.get("team_id"),
            "user": ident.get("user_id"),
        }
        out = []
        for scope in ("organization", "team", "user"):
            entity = entities[scope]
            if entity is None:
                continue
            # Budgets naming this entity first, then the per-entity ones, each in file order.
            for scoped in (True, False):
                for bid, b_scope, scope_id, limit, mode, period in BUDGETS:
                    if b_scope != scope or (scope_id is not None) != scoped:
                        continue
                    if scope_id is not None and scope_id != entity:
                        continue
                    out.append(Applied(bid, entity, f"{bid}/{entity}/{wk[period]}", limit, mode))
        return out

    def reclaim(self, now_ms: int, *, full: bool = False) -> None:
        """What every script does first: return the holds of (some) ended leases. The
        scripts that decide or report counters (authorize, check, status) return all of
        them (a larger backlog is drained before they answer); the others at most
        RECLAIM_BATCH."""
        due = sorted((end, rid) for rid, end in self.leases.items() if end <= now_ms)
        self.max_backlog = max(self.max_backlog, len(due))
        for _end, rid in due if full else due[:RECLAIM_BATCH]:
            r = self.reservations[rid]
            assert r.state == "H"
            for a in r.applied:
                self.held[a.cid] -= r.est
            r.state = "E"
            del self.leases[rid]
            self.stats["reclaimed"] += 1

    @staticmethod
    def over(used: int, held: int, est: int, limit: int) -> bool:
        if est == 0:
            return used + held >= limit
        return used + held + est > limit

    def values(self, applied: list[Applied]) -> list[tuple[str, str, int, int]]:
        return [(a.budget_id, a.entity, self.used[a.cid], self.held[a.cid]) for a in applied]

    def verdict(self, applied: list[Applied], est: int) -> tuple[bool, str, str | None]:
        """(allowed, action, binding block budget if denied)."""
        for a in applied:
            if a.mode == "b" and self.over(self.used[a.cid], self.held[a.cid], est, a.limit):
                return False, "block", a.budget_id
        for a in applied:
            if a.mode == "w" and self.over(self.used[a.cid], self.held[a.cid], est, a.limit):
                return True, "warn", None
        return True, "allow", None

    def hold(self, rid: str, applied: list[Applied], est: int, lease_end: int, **kw: Any) -> None:
        for a in applied:
            self.held[a.cid] += est
        self.reservations[rid] = Reservation(rid, "H", lease_end, est, kw["price"], applied)
        self.leases[rid] = lease_end
        if kw["key"] is not None:
            self.auth_keys[kw["key"]] = rid

    def finish(self, rid: str, new_state: str, charge: int, now_ms: int) -> dict[str, Any]:
        r = self.reservations[rid]
        assert r.state in "HE"
        returned = r.state == "E"
        for a in r.applied:
            if not returned:
                self.held[a.cid] -= r.est
            self.used[a.cid] += charge
        self.leases.pop(rid, None)
        r.state = new_state
        r.result = {
            "state": "settled" if new_state == "S" else "released",
            "cost": charge,
            "est": r.est,
            # The lease had ended, whether or not a reclaim had come to it yet.
            "lease_expired": returned or r.lease_end <= now_ms,
            "budgets": self.values(r.applied),
        }
        return r.result

    def nonzero(self) -> dict[str, int]:
        out = {f"u:{c}": v for c, v in self.used.items() if v}
        out.update({f"h:{c}": v for c, v in self.held.items() if v})
        return out


# ---- driving the app ----------------------------------------------------------------------


def budgets_of(body: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    return [
        (b["budget_id"], b["entity"], micro(b["used_usd"]), micro(b["held_usd"]))
        for b in body["budgets"]
    ]


def raw_counters(rc: redis.Redis) -> dict[str, int]:
    raw: dict[str, str] = rc.hgetall(CTR)  # type: ignore[assignment]
    # "a:<cid>" fields mark the thresholds already alerted (lua/_lib.lua), not amounts.
    values = {k: int(v) for k, v in raw.items() if not k.startswith(("a:", "w:"))}
    negative = {k: v for k, v in values.items() if v < 0}
    assert not negative, f"negative counters: {negative}"
    return {k: v for k, v in values.items() if v}


class Run:
    def __init__(self, client: Any, clock: FakeClock, rc: redis.Redis, seed: int) -> None:
        self.client = client
        self.clock = clock
        self.rc = rc
        self.rng = random.Random(seed)
        self.model = Model()
        self.ops = 0
        self.record_key_pool: list[str] = []
        self.auth_key_pool: list[str] = []
        # key -> the body that made its reservation (a retry re-sends it unchanged)
        self.auth_bodies: dict[str, tuple[dict[str, str], dict[str, Any]]] = {}
        self.seen_counters: set[tuple[str, str]] = set()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        self.ops += 1
        if method == "GET":
            r = await self.client.get(path)
        else:
            r = await self.client.post(path, json=body)
        data: dict[str, Any] = await r.json(content_type=None)
        return r.status, data

    # -- random inputs --

    def identity(self) -> dict[str, str]:
        rng = self.rng
        gen = self.ops // 1000  # fresh entities now and then, so budgets keep some room
        ident: dict[str, str] = {}
        if rng.random() < 0.97:
            ident["org_id"] = f"o{gen}{rng.choice('ab')}"
        if rng.random() < 0.75:
            ident["team_id"] = "shared" if rng.random() < 0.15 else f"t{gen}{rng.choice('xy')}"
        if rng.random() < 0.8:
            ident["user_id"] = f"u{gen}{rng.randrange(4)}"
        return ident

    def amount(self, top: int) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return 0
        if roll < 0.15:
            return rng.choice([1, 10, 100, 1000, 10_000, 100_000])
        return rng.randrange(1, top)

    def estimate(self, ident: dict[str, str]) -> tuple[dict[str, Any], int, tuple[int, int] | None]:
        """An authorize body's amount fields, the model's estimate, and the price held."""
        rng = self.rng
        model_name = rng.choice(list(PICO)) if rng.random() < 0.6 else None
        fields: dict[str, Any] = {}
        if model_name is not None:
            fields["model"] = model_name
            if rng.random() < 0.5:
                fields["provider"] = PROVIDER[model_name]
        price = PICO[model_name] if model_name else None
        if price is not None and rng.random() < 0.6:
            tin, tout = rng.randrange(0, 9000), rng.randrange(0, 2500)
            if rng.random() < 0.1:
                tin, tout = rng.choice([(0, 0), (1, 0), (0, 1), (1, 1)])
            fields["estimated_tokens_in"] = tin
            if rng.random() < 0.8 or tout:
                fields["estimated_tokens_out"] = tout
            est = cost(tin, price[0]) + cost(fields.get("estimated_tokens_out", 0), price[1])
            return fields, est, price
        if rng.random() < 0.1:
            # Exactly what is left on the tightest block budget, or one micro-USD off.
            applied = self.model.applicable(ident, self.clock.now_ms())
            room = [
                a.limit - self.model.used[a.cid] - self.model.held[a.cid]
                for a in applied
                if a.mode == "b"
            ]
            est = max(0, min(room, default=50_000) + rng.choice([-1, 0, 1]))
            est = min(est, 1_000_000)
        else:
            est = self.amount(150_000)
        fields["estimated_usd"] = usd(est)
        return fields, est, price

    # -- operations --

    async def authorize(
        self, ident: dict[str, str] | None = None, lease: int | None = -1, usd_est: int = -1
    ) -> None:
        rng, m = self.rng, self.model
        ident = ident if ident is not None else self.identity()
        if usd_est >= 0:
            fields, est, price = {"estimated_usd": usd(usd_est)}, usd_est, None
        else:
            fields, est, price = self.estimate(ident)
        est = max(est, FLOOR)
        body: dict[str, Any] = {**ident, **fields}
        if lease == -1:
            lease = rng.choice([100, 250, 1000, 5000, 20_000, 30_000, None, None])
        if lease is not None:
            body["lease_ms"] = lease
        key = None
        if rng.random() < 0.2:
            if self.auth_key_pool and rng.random() < 0.5:
                key = rng.choice(self.auth_key_pool)
                if key in self.auth_bodies and rng.random() < 0.9:
                    # A true retry of that request, as it was sent.
                    ident, body = self.auth_bodies[key]
                    body = dict(body)
            else:
                key = f"ak-{len(self.auth_key_pool)}"
                self.auth_key_pool.append(key)
            body["idempotency_key"] = key
        now = self.clock.now_ms()
        status, d = await self.call("POST", "/v1/authorize", body)
        assert status == 200 or (status == 409 and key in m.auth_keys), (body, d)

        m.reclaim(now, full=True)
        applied = m.applicable(ident, now)
        for a in applied:
            self.seen_counters.add((a.budget_id, a.entity))
        if key is not None and key in m.auth_keys:
            prior = m.reservations[m.auth_keys[key]]
            if body == self.auth_bodies[key][1] and prior.state == "H":
                m.stats["authorize_replayed"] += 1
                assert status == 200 and d["allowed"] is True and d["replayed"] is True
                assert d["reservation_id"] == prior.rid
                assert budgets_of(d) == m.values(applied), (body, d)
            else:
                # Another request, or a reservation no longer held: refused, no change.
                m.stats["authorize_key_refused"] += 1
                assert status == 409 and d["field"] == "idempotency_key", (body, d)
            return
        allowed, action, binding = m.verdict(applied, est)
        m.stats[f"authorize_{action}"] += 1
        assert (d["allowed"], d["action"], d["replayed"]) == (allowed, action, False), (body, d)
        assert micro(d["estimated_usd"]) == est, (body, d)
        if not allowed:
            assert d["reservation_id"] is None
            assert d["budget_info"]["budget_id"] == binding, (body, d)
            assert budgets_of(d) == m.values(applied), (body, d)
            return
        rid = d["reservation_id"]
        assert rid and rid not in m.reservations
        lease_ms = lease if lease is not None else 60_000
        m.hold(rid, applied, est, now + lease_ms, price=price, key=key)
        if key is not None:
            self.auth_bodies[key] = (ident, body)
            if rng.random() < 0.5:
                # The client's retry right away (its answer was lost): the same reservation.
                status, again = await self.call("POST", "/v1/authorize", body)
                assert status == 200 and again["replayed"] is True, (body, again)
                assert again["reservation_id"] == rid
                assert budgets_of(again) == m.values(applied), (body, again)
                m.stats["authorize_replayed"] += 1
        assert budgets_of(d) == m.values(applied), (body, d)

    def pick_reservation(self) -> str:
        rng, m = self.rng, self.model
        open_ = [r for r in m.reservations.values() if r.state in "HE"]
        if open_ and rng.random() < 0.75:
            return rng.choice(open_).rid
        if m.reservations and rng.random() < 0.97:
            return rng.choice(list(m.reservations))
        return f"{rng.getrandbits(128):032x}"  # well-formed, never issued

    async def settle(self) -> None:
        rng, m = self.rng, self.model
        rid = self.pick_reservation()
        r = m.reservations.get(rid)
        body: dict[str, Any] = {"reservation_id": rid}
        by_tokens = rng.random() < 0.4 and (r is None or r.price is not None or rng.random() < 0.1)
        charge = 0
        if by_tokens:
            tin, tout = rng.randrange(0, 12_000), rng.randrange(0, 3000)
            body["tokens_in"] = tin
            if tout or rng.random() < 0.5:
                body["tokens_out"] = tout
            if r is not None and r.price is not None:
                charge = cost(tin, r.price[0]) + cost(body.get("tokens_out", 0), r.price[1])
        else:
            top = r.est * 3 // 2 + 2 if r is not None else 100_000
            charge = self.amount(top) if rng.random() < 0.5 else rng.randrange(0, top)
            body["cost_usd"] = usd(charge)
        await self.finish("/v1/settle", body, rid, "S", charge, by_tokens)

    async def release(self) -> None:
        rid = self.pick_reservation()
        await self.finish("/v1/release", {"reservation_id": rid}, rid, "R", 0, False)

    async def finish(
        self, path: str, body: dict[str, Any], rid: str, new_state: str, charge: int, tokens: bool
    ) -> None:
        m = self.model
        now = self.clock.now_ms()
        status, d = await self.call("POST", path, body)
        m.reclaim(now)
        r = m.reservations.get(rid)
        if r is None:
            m.stats["finish_unknown"] += 1
            assert status == 404 and d["field"] == "reservation_id", (body, d)
            return
        if r.result is not None:
            m.stats["finish_replayed"] += 1
            expected, replayed = r.result, True
        else:
            if new_state == "S" and tokens and r.price is None:
                m.stats["settle_unpriced_tokens"] += 1
                charge = r.est  # no price to read tokens with: the hold is charged
            m.stats[f"finish_{new_state}_{'E' if r.state == 'E' else 'H'}"] += 1
            if r.state == "H" and r.lease_end <= now:
                m.stats["finish_before_reclaim"] += 1
            expected, replayed = m.finish(rid, new_state, charge, now), False
        assert status == 200, (body, d)
        got = {
            "state": d["state"],
            "cost": micro(d["cost_usd"]),
            "est": micro(d["estimated_usd"]),
            "lease_expired": d["lease_expired"],
            "budgets": budgets_of(d),
        }
        assert got == expected, (body, d)
        assert d["replayed"] is replayed and d["reservation_id"] == rid
        settled = expected["state"] == "settled"
        error = max(0, expected["cost"] - expected["est"]) if settled else 0
        assert micro(d["estimate_error_usd"]) == error
        # The spend past the cap of block budgets this charge added (its first result).
        overshoot = 0
        if settled:
            for budget_id, _entity, after, _held in expected["budgets"]:
                limit, mode = LIMITS[budget_id]
                if mode == "b":
                    before = after - expected["cost"]
                    past = max(0, after - limit) - max(0, before - limit)
                    overshoot = max(overshoot, past)
        assert micro(d["overshoot_usd"]) == overshoot

    async def check(self) -> None:
        m = self.model
        ident = self.identity()
        est = self.amount(150_000) if self.rng.random() < 0.8 else 0
        body = {**ident, "estimated_usd": usd(est)}
        est = max(est, FLOOR)
        now = self.clock.now_ms()
        status, d = await self.call("POST", "/v1/check", body)
        assert status == 200, (body, d)
        m.reclaim(now, full=True)
        applied = m.applicable(ident, now)
        allowed, action, binding = m.verdict(applied, est)
        m.stats[f"check_{action}"] += 1
        assert (d["allowed"], d["action"]) == (allowed, action), (body, d)
        if binding is not None:
            assert d["budget_info"]["budget_id"] == binding
        assert budgets_of(d) == m.values(applied), (body, d)

    async def record(self) -> None:
        rng, m = self.rng, self.model
        ident = self.identity()
        body: dict[str, Any] = dict(ident)
        if rng.random() < 0.5:
            model_name = rng.choice(list(PICO))
            tin, tout = rng.randrange(0, 5000), rng.randrange(0, 1000)
            body.update(model=model_name, tokens_in=tin, tokens_out=tout)
            charge = cost(tin, PICO[model_name][0]) + cost(tout, PICO[model_name][1])
        else:
            charge = self.amount(60_000)
            body["cost_usd"] = usd(charge)
        key = None
        if rng.random() < 0.5:
            if self.record_key_pool and rng.random() < 0.4:
                key = rng.choice(self.record_key_pool)
            else:
                key = f"rk-{len(self.record_key_pool)}"
                self.record_key_pool.append(key)
            body["idempotency_key"] = key
        now = self.clock.now_ms()
        status, d = await self.call("POST", "/v1/record", body)
        assert status == 200, (body, d)
        m.reclaim(now)
        applied = m.applicable(ident, now)
        for a in applied:
            self.seen_counters.add((a.budget_id, a.entity))
        replayed = key is not None and key in m.record_keys
        m.stats["record_replayed" if replayed else "record"] += 1
        if not replayed:
            for a in applied:
                m.used[a.cid] += charge
            if key is not None:
                m.record_keys.add(key)
        assert d["replayed"] is replayed, (body, d)
        assert micro(d["cost_usd"]) == charge
        assert budgets_of(d) == m.values(applied), (body, d)

    async def status(self, budget_id: str | None = None, entity: str | None = None) -> None:
        m = self.model
        if budget_id is None or entity is None:
            budget_id, entity = self.rng.choice(sorted(self.seen_counters))
        scoped = next(b[2] for b in BUDGETS if b[0] == budget_id) is not None
        path = f"/v1/budgets/{budget_id}/status" + ("" if scoped else f"?scope_id={entity}")
        now = self.clock.now_ms()
        status, d = await self.call("GET", path)
        assert status == 200, (path, d)
        m.reclaim(now, full=True)
        m.stats["status"] += 1
        period = next(b[5] for b in BUDGETS if b[0] == budget_id)
        cid = f"{budget_id}/{entity}/{window_keys(now)[period]}"
        assert (micro(d["used_usd"]), micro(d["held_usd"])) == (m.used[cid], m.held[cid]), path

    def advance(self, ms: int) -> None:
        self.ops += 1
        self.clock.advance(ms)
        self.model.stats["advance"] += 1

    async def burst(self) -> None:
        """Many leases ending at once: more than one reclaim batch."""
        rng, m = self.rng, self.model
        ident = {"org_id": f"burst{self.ops // 1000}"}
        before = set(m.reservations)
        for _ in range(rng.randrange(33, 45)):
            await self.authorize(ident, lease=100, usd_est=rng.randrange(0, 2000))
        self.advance(100)
        m.stats["burst"] += 1
        # Settle or release the one that the first reclaim after this leaves for later
        # (equal lease ends: reclaimed in reservation-id order).
        last = max(set(m.reservations) - before)
        if rng.random() < 0.5:
            body = {"reservation_id": last, "cost_usd": usd(1234)}
            await self.finish("/v1/settle", body, last, "S", 1234, False)
        else:
            await self.finish("/v1/release", {"reservation_id": last}, last, "R", 0, False)

    def compare_raw(self) -> None:
        assert raw_counters(self.rc) == self.model.nonzero()
        assert self.rc.zcard(LEASE) == len(self.model.leases)


async def test_random_operations_match_the_model(
    make_client: ClientFactory,
    clock: FakeClock,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reservation ids order the reclaim of leases that end together; seeded ids make the
    # whole run repeat exactly (the model never relies on this: it reads the ids it gets).
    ids = random.Random(SEED + 1)
    monkeypatch.setattr(engine_mod, "new_reservation_id", lambda: f"{ids.getrandbits(128):032x}")
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    run = Run(client, clock, redis_client, SEED)
    rng, m = run.rng, run.model
    next_compare = COMPARE_EVERY
    while run.ops < N_OPS:
        roll = rng.random()
        if roll < 0.38:
            await run.authorize()
        elif roll < 0.61:
            await run.settle()
        elif roll < 0.73:
            await run.release()
        elif roll < 0.875:
            run.advance(rng.choice([1, 50, 99, 100, 101, 250, 500, 999, 1000, 1001]))
        elif roll < 0.89:
            run.advance(rng.choice([5000, 20_000, 60_000]))
        elif roll < 0.925:
            await run.check()
        elif roll < 0.96:
            await run.record()
        elif roll < 0.999:
            if run.seen_counters:
                await run.status()
        else:
            await run.burst()
        if run.ops >= next_compare:
            run.compare_raw()
            next_compare += COMPARE_EVERY

    # Every operation above ran on one calendar day, so no counter changed window.
    assert clock.now_ms() - T0_MS < 11 * 3_600_000
    run.compare_raw()

    # Each reservation is in the state the model says, with the cost the model charged.
    records: dict[str, str] = redis_client.hgetall(RES)  # type: ignore[assignment]
    for rid, r in m.reservations.items():
        fields = records[rid].split("|")
        assert fields[0] == r.state, rid
        if r.result is not None:
            assert int(fields[7]) == r.result["cost"], rid

    # The status endpoint agrees with the model on every counter it can name.
    for budget_id, entity in sorted(run.seen_counters):
        await run.status(budget_id, entity)
    run.compare_raw()

    # Once every lease has ended and been reclaimed, nothing is held anywhere.
    run.advance(3_600_000)
    while m.leases:
        await run.status(*sorted(run.seen_counters)[0])
    run.compare_raw()
    assert all(v == 0 for v in m.held.values())
    assert not [k for k in raw_counters(redis_client) if k.startswith("h:")]

    # The run exercised what it claims to (so a passing run is not a vacuous one).
    s = m.stats
    for what, least in [
        ("authorize_allow", 500),
        ("authorize_warn", 100),
        ("authorize_block", 300),
        ("authorize_replayed", 50),
        ("authorize_key_refused", 20),
        ("finish_S_H", 200),
        ("finish_S_E", 100),
        ("finish_R_H", 100),
        ("finish_R_E", 50),
        ("finish_replayed", 200),
        ("finish_unknown", 5),
        ("settle_unpriced_tokens", 5),
        ("reclaimed", 500),
        ("record", 50),
        ("record_replayed", 20),
        ("check_block", 10),
        ("burst", 3),
        ("finish_before_reclaim", 3),
    ]:
        assert s[what] >= least, (what, dict(s))
    assert m.max_backlog > RECLAIM_BATCH, dict(s)
