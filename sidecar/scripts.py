"""The Lua scripts: read from lua/ (in the repo, or inside the installed package), each
prefixed with lua/_lib.lua (only the helpers it calls: library_for), and identified by the
SHA1 that SCRIPT LOAD will return."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

OPERATIONS = (
    "authorize", "check", "settle", "release", "record", "status", "reclaim", "sweep", "stops",
    "settle_lost", "record_lost",
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


# A helper of _lib.lua: from its top-level definition line ("local function NAME(" or, for
# one declared before, "NAME = function(") to the first "end" at the start of a line.
_HELPER = re.compile(
    r"^(?:local function ([A-Za-z_]\w*)|([A-Za-z_]\w*) = function)\b.*?^end$", re.M | re.S
)
_NAME = re.compile(r"[A-Za-z_]\w*")
_DECLARATION = re.compile(r"^local [A-Za-z_]\w*[ \t]*$", re.M)


def _code(text: str) -> str:
    """`text` without its comments: each line cut at a "--" that is not inside a string
    (an even number of quotes before it). A "--" the cut misjudges can only keep more."""
    lines = []
    for line in text.split("\n"):
        at = line.find("--")
        while at >= 0 and (line.count("'", 0, at) % 2 or line.count('"', 0, at) % 2):
            at = line.find("--", at + 2)
        lines.append(line if at < 0 else line[:at])
    return "\n".join(lines)


def library_for(lib: str, operation: str) -> str:
    """_lib.lua with only the helpers `operation` calls, directly or through each other
    (every other line kept as it is). Redis runs a script's whole text at every call, and
    every function it defines is a closure made anew each time: about 1,000 instructions
    each (settle calls 30 of the 44 helpers; 11k of its instructions were the 14 others)."""
    helpers = {(m.group(1) or m.group(2)): m for m in _HELPER.finditer(lib)}
    calls = {name: set(_NAME.findall(_code(m.group(0)))) - {name} for name, m in helpers.items()}
    # The lines outside the helpers are always kept; what their constants use is wanted,
    # not what a bare declaration ("local charge_at_end") names.
    outside = _DECLARATION.sub("", _code(_HELPER.sub("", lib)))
    wanted: set[str] = set()
    todo = set(_NAME.findall(_code(operation))) | set(_NAME.findall(outside))
    while todo:
        name = todo.pop()
        if name in helpers and name not in wanted:
            wanted.add(name)
            todo |= calls[name]
    return _HELPER.sub(lambda m: m.group(0) if (m.group(1) or m.group(2)) in wanted else "", lib)


def load(name: str) -> Script:
    folder = _lua_dir()
    operation = (folder / f"{name}.lua").read_text()
    source = library_for((folder / "_lib.lua").read_text(), operation) + "\n" + operation
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
    record_lost: Script  # a record whose answer was lost, counted once (off the hot path)

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
                self.record_lost,
            )
        )
