"""The Lua scripts: read from lua/ (in the repo, or inside the installed package), each
prefixed with lua/_lib.lua, and identified by the SHA1 that SCRIPT LOAD will return."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

OPERATIONS = (
    "authorize", "check", "settle", "release", "record", "status", "reclaim", "sweep", "stops",
    "settle_lost",
)  # fmt: skip
# Scripts run alone (no _lib.lua), off the hot path, through redis-py.
STANDALONE = ("alert_drops", "definition_create", "definition_put", "state_marker")


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def _lua_dir() -> Path:
    # A wheel carries the scripts as sidecar/lua (see pyproject); a checkout or an
    # editable install reads the repo's top-level lua/.
    packaged = resources.files("sidecar").joinpath("lua")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "lua"


def standalone(name: str) -> str:
    """A script's source without lua/_lib.lua, for one that shares nothing with the
    decisions (lua/definition_put.lua), run off the hot path through redis-py."""
    return (_lua_dir() / f"{name}.lua").read_text()


def load(name: str) -> Script:
    folder = _lua_dir()
    source = (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()
    return Script(name=name, source=source, sha=hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Scripts:
    authorize: Script
    check: Script
    settle: Script
    release: Script
    record: Script
    status: Script
    reclaim: Script
    sweep: Script
    stops: Script  # the stop switch (sidecar.stops): off the hot path
    settle_lost: Script  # a settle whose answer was lost, counted once (off the hot path)

    @classmethod
    def load_all(cls) -> Scripts:
        return cls(*(load(name) for name in OPERATIONS))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(
            (
                self.authorize,
                self.check,
                self.settle,
                self.release,
                self.record,
                self.status,
                self.reclaim,
                self.sweep,
                self.stops,
                self.settle_lost,
            )
        )
