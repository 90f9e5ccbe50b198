"""The Lua scripts: read from lua/ (in the repo, or inside the installed package), each
prefixed with lua/_lib.lua (only the helpers it calls: library_for), and identified by the
SHA1 that SCRIPT LOAD will return.

The same operations also make one Redis 7 function library (Library): lua/_lib.lua once,
then each operation as a function of it. A script run by EVALSHA makes every helper it
carries anew at each call (a closure, about 1,000 instructions each: 35-38k per authorize or
settle); a library makes them once, when it is loaded, and FCALL only runs the operation.
The store calls the function where the server has FCALL and the script by EVALSHA where it
has not (Redis 6.2), so both forms run the same operation text."""

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
class Library:
    """The operations as one Redis function library: FUNCTION LOAD `source`."""

    name: str
    source: str


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str
    # Its function in `library` ('' = none: EVALSHA only).
    function: str = ""
    library: Library | None = None


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


# Every version's library is named so (sidecar.store collects those of gone versions).
LIBRARY_PREFIX = "budget_sidecar_"

# Set at the start of every function call, before the operation's text runs: what each
# operation and helper reads as KEYS and ARGV (a script's globals, a function's arguments),
# and _lib.lua's per-call tallies (see its done()), which a script starts afresh each call.
_CALL_START = "KEYS, ARGV, reclaimed_now, charged_now, charged_costs = keys, args, 0, 0, {}"


def library(scripts: list[Script]) -> tuple[Library, list[Script]]:
    """The function library of `scripts` and the scripts with their functions named.

    The library's name carries a hash of its text, and each function's name the library's
    and its script's SHA1, so that two versions of the sidecar (a rolling deploy) load two
    libraries side by side and each calls only its own; Redis names functions across all
    libraries, so a name must not repeat between versions either. In the library's text
    each name is written in two halves: a byte match of a script's SHA1 (a test's proxy
    holding one call, an operator's grep of MONITOR) finds the call, not the upload."""
    lib = (_lua_dir() / "_lib.lua").read_text()
    body = [f"local KEYS, ARGV\n{lib}\n"]
    for script in scripts:
        operation = (_lua_dir() / f"{script.name}.lua").read_text()
        half = len(script.sha) // 2
        body.append(
            f"\nregister('{script.name}_{script.sha[:half]}', '{script.sha[half:]}',"
            f" function(keys, args)\n{_CALL_START}\n{operation}\nend)\n"
        )
    text = "".join(body)
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    name, prefix = f"{LIBRARY_PREFIX}{digest}", f"bs_{digest}_"
    head = (
        f"#!lua name={name}\n"
        f"local function register(a, b, f) redis.register_function('{prefix}' .. a .. b, f) end\n"
    )
    made = Library(name=name, source=head + text)
    named = [
        Script(s.name, s.source, s.sha, function=f"{prefix}{s.name}_{s.sha}", library=made)
        for s in scripts
    ]
    return made, named


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
        _, named = library([load(name) for name in OPERATIONS])
        return cls(*named)

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
