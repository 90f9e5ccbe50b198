"""The one place Redis key names (and counter ids inside them) are built.

Layout, for tenant T (every key carries the hash tag `{T}` so one tenant's keys share one
Redis Cluster slot and a script may touch all of them atomically, invariant 6):

    bs:{T}:ctr     hash   "u:<cid>" settled micro-USD, "h:<cid>" held micro-USD, "c:<cid>"
                          calls; limiters; and the stops in force, "s:<stop field>" -> the
                          stop (as in bs:{T}:stops): the decision reads them in its one
                          HMGET, so it names no key that may not exist
    bs:{T}:lease   zset   reservation id -> lease end (Unix ms)
    bs:{T}:res     hash   reservation id -> record; "k:<idempotency key>" -> reservation id;
                          "q:<idempotency key>" -> who counts its charge, "w:<key>" ->
                          attempts lost before it charged (keys of /v1/record:
                          lua/record.lua ARGV[11])
    bs:{T}:gc      zset   "r:<rid>" / "q:<key>" -> Unix ms after which it may go (counters
                          and limiters have no index: the sweep walks ctr, sweep.lua)
    bs:{T}:usage   stream the usage ledger: one entry per settle and record (bounded by
                          count and age)
    bs:{T}:agg:<yyyymmdd>  hash  that UTC day's usage totals per (provider, model, org,
                          team, agent, workflow): "c|" cost, "n|" requests, "i|" tokens
                          in, "o|" tokens out (expires after usage_aggregate_days). Days
                          written before issue 16 also carry user and step in the tuple.
    bs:{T}:uagg:<yyyymmdd> hash  that UTC day's totals per (user, step) of the calls that
                          name one: "cost:requests:in:out" (expires after the shorter
                          usage_user_aggregate_days: users are many)
    bs:{T}:sweep   string where the background sweep's walk over ctr is (an HSCAN cursor)
    bs:{T}:alerts  stream threshold alerts, written by the script that charged, and guard
                          trips (stops, loops, call caps, velocity); read by the alerts
                          route and by the webhook deliverers' consumer groups
    bs:{T}:loop:<guard>/<entity>  hash  a loop guard's memory of one entity: per
                          fingerprint (at most 64) "<alerted 0|1>|<ms>,<ms>,...", and "~"
                          the ms it is kept to; expires one to two windows after the
                          entity's newest call (lua/_lib.lua loop_write)
    bs:{T}:est     hash   learned estimates (issue 19): per series "<provider>/<model>/<agent>"
                          (estimate_series) one field "count:p95:c1,c2,...:t1.t2"
                          holding the last LEARN_RING settled costs (micro-USD, oldest
                          first), their cached p95 and their two largest.
                          Written by settle.lua, read by authorize.lua and check.lua;
                          expires estimate_stats_days after the last settle that taught
                          it, and holds at most estimate_max_series fields
    bs:{T}:stops   hash   the stop switch's own record, for lists and lifts by id
                          (lua/stops.lua writes it and mirrors each stop into ctr; no
                          decision reads it): "<scope>:<escaped entity>" (stop_field) ->
                          "<stop id>|<expires_at ms, 0 = never>|<created ms>|<reason>"
                          (reason last, may hold '|'); "#<stop id>" -> that field.
                          An ended stop goes with its mirror (lua/sweep.lua) or a list
    bs:{T}:epoch   hash   the store's state marker for this tenant's slot (sidecar.state_loss,
                          lua/state_marker.lua): id -> a random id written once; gone or
                          another id means Redis lost what it held; gen -> one more at every
                          check, lower than one a sidecar saw means Redis went back to an
                          older state (refreshed to a 30-day expiry by every check)
    bs:{T}:defs    hash   admin-API definitions, "rl:<id>" / "b:<id>" / "p:<provider>/<model>"
                          -> JSON (off the hot path)

A counter id (cid) is `<budget id>/<entity>/<window key>`, e.g. `b1/team-1/m20261101`;
a rate limiter's fields ("n:", "x:" in the same hash) end in `<limit id>/<entity>`, its
debt and last update ("d:", "l:") in `<limit id>/<entity>/<limit>/<window_ms>`.
Keeping all counters of a tenant in one hash is what lets settle name every key it touches
in KEYS without a read first: the reservation record lists the cids, which are fields, not
keys.

Every component is escaped: characters outside [A-Za-z0-9._~@+-] become %XX, so no input
can open or close a hash tag, add a separator, or make two identities share a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, unquote

_SAFE = re.compile(r"[A-Za-z0-9._~@+\-]+")
PREFIX = "bs"


def escape(component: str) -> str:
    """Escape one name component; identity for the common already-safe case."""
    if _SAFE.fullmatch(component):
        return component
    # quote() never emits a bare "%", so "%" alone can name the empty string.
    # surrogatepass: a lone surrogate (valid in a Python str, not in UTF-8) still escapes,
    # to bytes no other string produces.
    return quote(component, safe="", encoding="utf-8", errors="surrogatepass") if component else "%"


@dataclass(frozen=True, slots=True)
class TenantKeys:
    tenant: str
    counters: str
    leases: str
    reservations: str
    gc: str
    usage: str
    alerts: str
    sweep: str
    estimates: str
    stops: str

    @property
    def hot(self) -> tuple[str, str, str, str]:
        """The KEYS of every reservation script, in their documented order."""
        return (self.counters, self.leases, self.reservations, self.gc)

    def charging(self, day: str) -> tuple[str, str, str, str, str, str, str, str]:
        """The KEYS of the scripts that charge (settle, record): the reservation keys, then
        the usage ledger, the alerts, and the aggregate hashes of UTC day `day`
        (yyyymmdd): the totals, then the per-user totals."""
        return (*self.hot, self.usage, self.alerts, self.usage_day(day), self.user_day(day))

    def learning(self, day: str) -> tuple[str, ...]:
        """The KEYS of authorize, check and settle: the charging keys (reclaim may charge),
        then the learned-estimate statistics (KEYS[9]). Scripts that take fewer ignore it."""
        return (*self.charging(day), self.estimates)

    def sweeping(self, day: str) -> tuple[str, ...]:
        """sweep.lua's KEYS: the charging keys (reclaim may charge), the sweep's place and
        the stops' records."""
        return (*self.charging(day), self.sweep, self.stops)

    def loop(self, guard_id: str, entity: str) -> str:
        """One loop guard's memory of one entity's recent calls (a string that expires with
        the guard's window)."""
        return loop_key(self.tenant, guard_id, entity)

    def usage_day(self, day: str) -> str:
        return f"{self.counters[: -len('ctr')]}agg:{day}"

    def user_day(self, day: str) -> str:
        return f"{self.counters[: -len('ctr')]}uagg:{day}"


@lru_cache(maxsize=4096)
def tenant_keys(tenant: str) -> TenantKeys:
    tag = f"{PREFIX}:{{{escape(tenant)}}}:"
    return TenantKeys(
        tenant=tenant,
        counters=tag + "ctr",
        leases=tag + "lease",
        reservations=tag + "res",
        gc=tag + "gc",
        usage=tag + "usage",
        alerts=tag + "alerts",
        sweep=tag + "sweep",
        estimates=tag + "est",
        stops=tag + "stops",
    )


@lru_cache(maxsize=4096)
def loop_key(tenant: str, guard_id: str, entity: str) -> str:
    """A loop guard's key for one entity (cached: the hot path names one per guard)."""
    tag = tenant_keys(tenant).counters[: -len("ctr")]
    return f"{tag}loop:{escape(guard_id)}/{escape(entity)}"


def definitions(tenant: str) -> str:
    """Hash of the definitions a tenant made through the admin API ("rl:<id>" -> JSON)."""
    return f"{PREFIX}:{{{escape(tenant)}}}:defs"


# Off the hot path and outside any script: every replica polls DEFS_VERSION (bumped with
# each definition write) and reloads the tenants in DEFS_TENANTS when it moves.
DEFS_VERSION = f"{PREFIX}:{{defs}}:version"
DEFS_TENANTS = f"{PREFIX}:{{defs}}:tenants"
# The state marker of the definitions' own slot (see state_marker).
DEFS_EPOCH = f"{PREFIX}:{{defs}}:epoch"


# The keys of a tenant that only the background sweep collects (no TTL): what it looks
# for to find a tenant that left the config (sidecar/sweep.py).
_COLLECTED = re.compile(rf"^{PREFIX}:\{{([^{{}}]*)\}}:(?:ctr|lease|res|gc|usage|alerts)\Z")
TENANT_KEYS_MATCH = f"{PREFIX}:{{*}}:*"  # a SCAN pattern over every tenant's keys


def collected_tenant(key: str) -> str | None:
    """The tenant whose counters, leases, reservations, gc index, usage ledger or alerts
    `key` is, else None."""
    found = _COLLECTED.match(key)
    return _unescape(found.group(1)) if found else None


def state_marker(tenant: str) -> str:
    """The marker of a tenant's slot whose disappearance says Redis lost its state."""
    return f"{PREFIX}:{{{escape(tenant)}}}:epoch"


def counter_id(budget_id: str, entity: str, window_key: str) -> str:
    return f"{escape(budget_id)}/{escape(entity)}/{window_key}"


def ctr_field(kind: str, ident: str) -> str:
    """A field of a tenant's counters hash (ctr, lua/_lib.lua's header): "<kind>:<id>",
    kind "u" / "h" / "c" / "w" of a counter id, "d" / "l" / "n" of a rate id, "s" of a stop
    field."""
    return f"{kind}:{ident}"


def rate_id(limit_id: str, entity: str) -> str:
    """The id of one rate limit's limiter for one entity (rolling: no window key): what a
    reservation record names, the suffix of its concurrency count ("n:") and of a usd
    limiter's alert mark ("x:")."""
    return f"{escape(limit_id)}/{escape(entity)}"


def limiter_state(rate: str, limit: int, window_ms: int) -> str:
    """The suffix of a windowed limiter's debt and last-update fields ("d:", "l:"):
    `<rate id>/<limit>/<window_ms>`. A debt is counted in units of its window and paid
    back at its limit, so it means something only for that definition: a limit whose
    limit or window changes gets new fields and starts over, and a settle or release of
    a hold made before the change corrects the fields it was charged to (lua/_lib.lua
    correct_tokens builds the same name from the record), never the new ones."""
    return f"{rate}/{limit}/{window_ms}"


@lru_cache(maxsize=4096)
def estimate_series(provider: str | None, model: str | None, agent: str | None) -> str:
    """The field of the learned-estimate hash for calls of this model and agent, as
    authorize knows them ('' where it does not: the agent-less calls of a model share one
    series). Escaped, so it holds no '|' or ',' (it is stored in a reservation record)."""
    return f"{escape(provider or '')}/{escape(model or '')}/{escape(agent or '')}"


def stop_field(scope: str, entity: str) -> str:
    """The field of bs:{T}:stops that names one entity's stop, `<scope>:<escaped entity>`
    (a scope is a Scope value, never holding ':'; the escaped entity holds no ':'); its
    mirror in ctr is `s:` and this."""
    return f"{scope}:{escape(entity)}"


def parse_stop_field(field: str) -> tuple[str, str]:
    """(scope, entity) of a stop field, unescaped."""
    scope, _, entity = field.partition(":")
    return scope, _unescape(entity)


def parse_counter_id(cid: str) -> tuple[str, str, str]:
    """(budget id, entity, window key) of a cid, unescaped."""
    budget_id, entity, window_key = cid.split("/")
    return _unescape(budget_id), _unescape(entity), window_key


def unescape(component: str) -> str:
    """The name component `escape` made (its inverse)."""
    return _unescape(component)


def _unescape(component: str) -> str:
    return "" if component == "%" else unquote(component, errors="surrogatepass")
