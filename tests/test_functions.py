"""The operations as a Redis 7 function library (sidecar.scripts.library, FCALL), and the
scripts (EVALSHA) where the server has no functions: what each path runs, what a lost
library costs (loaded again, each call run once), two versions side by side, Redis 6.2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar import scripts
from sidecar.scripts import OPERATIONS, Scripts
from sidecar.store import MAX_LIBRARIES
from tests.harness import RedisServer, redis6_binary
from tests.test_redis_fault_attacks import (
    TENANT,
    app_over,
    call,
    held_micro,
    settings_doc,
    used_micro,
)

CAP = {"id": "org", "name": "The org", "scope": "organization", "limit_usd": 5.0, "period": "daily"}


@pytest.fixture
def redis6() -> Iterator[RedisServer]:
    server = RedisServer(binary=redis6_binary()).start()
    try:
        yield server
    finally:
        server.cleanup()


def libraries(rc: redis.Redis) -> dict[str, list[str]]:
    """Library name -> its function names, as FUNCTION LIST tells them."""
    out: dict[str, list[str]] = {}
    for lib in rc.function_list():  # each one a flat list of names and values
        fields = dict(zip(lib[::2], lib[1::2], strict=True))
        out[fields["library_name"]] = sorted(
            f[f.index("name") + 1] for f in fields["functions"]
        )
    return out


def test_the_library_holds_every_operation_under_names_that_carry_its_hash(
    server: RedisServer,
) -> None:
    every = list(Scripts.load_all())
    lib = every[0].library
    assert lib is not None and all(s.library is lib for s in every)
    rc = server.client()
    assert rc.execute_command("FUNCTION", "LOAD", lib.source) == lib.name
    assert libraries(rc) == {lib.name: sorted(s.function for s in every)}
    for s in every:
        # The call carries the script's SHA1 (a byte match of it finds the call); the
        # upload does not (the same match must not take the library for the call).
        assert lib.name.startswith("budget_sidecar_")
        assert s.function == f"bs_{lib.name.removeprefix('budget_sidecar_')}_{s.name}_{s.sha}"
        assert s.sha not in lib.source
    # A second sidecar of the same version finds it loaded: refused, nothing replaced.
    with pytest.raises(redis.ResponseError, match="already exists"):
        rc.execute_command("FUNCTION", "LOAD", lib.source)
    assert len(libraries(rc)) == 1


def test_two_versions_load_side_by_side(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling deploy: a version whose _lib.lua differs by one line loads its own library
    next to this one's, and each version's FCALL runs its own."""
    ours = Scripts.load_all()
    for f in scripts._lua_dir().glob("*.lua"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "_lib.lua").write_text((tmp_path / "_lib.lua").read_text() + "\n-- v2\n")
    monkeypatch.setattr(scripts, "_lua_dir", lambda: tmp_path)
    theirs = Scripts.load_all()
    assert ours.settle.library is not None and theirs.settle.library is not None
    assert ours.settle.library.name != theirs.settle.library.name
    rc = server.client()
    for s in (ours.status, theirs.status):
        assert s.library is not None
        rc.execute_command("FUNCTION", "LOAD", s.library.source)
    assert len(libraries(rc)) == 2
    # status.lua of each (KEYS ctr lease res gc; ARGV now keep, then cids): no counter yet,
    # so {1, u, h, window, calls} and the two expiry counts.
    for s in (ours.status, theirs.status):
        reply = rc.execute_command(
            "FCALL", s.function, 4, TENANT.counters, TENANT.leases, TENANT.reservations,
            TENANT.gc, 1, 1000, "org/o1/d20260310",
        )  # fmt: skip
        assert reply == [1, 0, 0, "", 0, 0, 0], reply


async def _calls(client: Any, flush: Any, rc: redis.Redis) -> dict[str, Any]:
    """Authorize twice, settle one, release the other, check, with `flush` before each call:
    what the counters hold after."""
    rids = []
    for _ in range(2):
        flush()
        status, body = await call(client, "/v1/authorize", {"org_id": "o1", "estimated_usd": 0.5})
        assert status == 200 and body["allowed"] is True, body
        rids.append(body["reservation_id"])
    assert held_micro(rc) == 1_000_000
    flush()
    status, body = await call(client, "/v1/settle", {"reservation_id": rids[0], "cost_usd": 0.3})
    assert status == 200 and body["replayed"] is False, body
    flush()
    status, body = await call(client, "/v1/release", {"reservation_id": rids[1]})
    assert status == 200 and body["replayed"] is False, body
    flush()
    status, body = await call(client, "/v1/check", {"org_id": "o1", "estimated_usd": 0.1})
    assert status == 200 and body["allowed"] is True, body
    return {"held": held_micro(rc), "used": used_micro(rc)}


async def test_every_call_after_a_function_flush_loads_the_library_and_runs_once(
    server: RedisServer,
) -> None:
    """FUNCTION FLUSH before every call (a restart without persistence, a fresh replica):
    the call finds its function missing, loads the library and runs once; nothing is
    charged or returned twice, and nothing went through EVAL (the script cache is empty)."""
    rc = server.client()
    client = await app_over(server.url, settings_doc("closed", cap=CAP))
    try:
        got = await _calls(client, lambda: rc.execute_command("FUNCTION", "FLUSH"), rc)
        assert got == {"held": 0, "used": 300_000}
        lib = Scripts.load_all().settle.library
        assert lib is not None and list(libraries(rc)) == [lib.name]
        every = Scripts.load_all()
        assert rc.script_exists(*(s.sha for s in every)) == [False] * len(OPERATIONS)
        # Each of the 5 calls: its FCALL refused, the library loaded, the FCALL again.
        info = rc.info("commandstats")
        assert info["cmdstat_function|load"]["calls"] >= 5, info
        assert info["cmdstat_fcall"]["calls"] >= 10, info
    finally:
        await client.close()


async def test_redis_6_2_runs_the_scripts_and_recovers_after_a_script_flush(
    redis6: RedisServer,
) -> None:
    """Redis 6.2 has no FCALL: the first call tells the connection so, every call then
    runs its script by EVALSHA, and a SCRIPT FLUSH before each call is healed by EVAL."""
    rc = redis6.client()
    assert rc.info("server")["redis_version"].startswith("6.")
    client = await app_over(redis6.url, settings_doc("closed", cap=CAP))
    try:
        got = await _calls(client, rc.script_flush, rc)
        assert got == {"held": 0, "used": 300_000}
        info = rc.info("commandstats")
        assert info["cmdstat_evalsha"]["calls"] > 0 and info["cmdstat_eval"]["calls"] > 0
        assert "cmdstat_fcall" not in info  # an unknown command is not counted
    finally:
        await client.close()


def _foreign(name: str) -> str:
    return f"#!lua name={name}\nredis.register_function('{name}_f', function() return 1 end)"


@pytest.mark.parametrize("versions", [3, 4])
async def test_libraries_of_gone_versions_are_collected_past_the_bound(
    server: RedisServer, versions: int
) -> None:
    """Each version leaves its library behind. Loading ours next to 3 other versions' keeps
    them (4 side by side: MAX_LIBRARIES); next to 4, ours deletes them (a version still
    running loads its own again). A library that is not a sidecar's is never touched."""
    rc = server.client()
    others = [f"budget_sidecar_{i:016x}" for i in range(versions)]
    for name in [*others, "someone_elses"]:
        rc.execute_command("FUNCTION", "LOAD", _foreign(name))
    client = await app_over(server.url, settings_doc("closed", cap=CAP))
    try:
        status, body = await call(client, "/v1/check", {"org_id": "o1", "estimated_usd": 0.1})
        assert status == 200 and body["allowed"] is True, body
        ours = Scripts.load_all().check.library
        assert ours is not None
        kept = others if versions + 1 <= MAX_LIBRARIES else []
        assert sorted(libraries(rc)) == sorted([ours.name, *kept, "someone_elses"])
        # A deleted version's function answers "not found": its sidecar reloads it.
        if not kept:
            with pytest.raises(redis.ResponseError, match="Function not found"):
                rc.execute_command("FCALL", f"{others[0]}_f", 0)
    finally:
        await client.close()


@pytest.mark.parametrize("refused", ["-fcall", "-function"])
async def test_an_acl_that_refuses_functions_runs_the_scripts(
    server: RedisServer, refused: str
) -> None:
    """A user whose ACL refuses FCALL (or FUNCTION LOAD): NOPERM, nothing ran; the call
    goes by script and every later one by EVALSHA, each run once."""
    rc = server.client()
    rc.execute_command("ACL", "SETUSER", "lim", "on", ">pw", "~*", "&*", "+@all", refused)
    client = await app_over(
        f"redis://lim:pw@127.0.0.1:{server.port}/0", settings_doc("closed", cap=CAP)
    )
    try:
        rc.config_resetstat()
        got = await _calls(client, lambda: None, rc)
        assert got == {"held": 0, "used": 300_000}
        info = rc.info("commandstats")
        assert info["cmdstat_evalsha"]["calls"] >= 5, info
        # The refusal of the connection's first call (at start-up) told it: no FCALL since.
        assert "cmdstat_fcall" not in info, info
        assert rc.script_exists(Scripts.load_all().settle.sha) == [True]
    finally:
        await client.close()
