"""sidecar.resp packs commands itself (a cache of each argument's bulk string): the bytes
must be hiredis.pack_command's, for every kind of argument it is given."""

from __future__ import annotations

import random

import hiredis
import pytest

from sidecar import resp


def hiredis_pack(args: tuple[str | int | bytes | float, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


CASES: list[tuple[str | int | bytes, ...]] = [
    ("PING",),
    ("EVALSHA", "f" * 40, 3, "{bs:t}:a", "{bs:t}:b", "{bs:t}:c", 1767225600000, "", 0, -1),
    ("SET", "ключ", "é\x1fx", b"\x00\xff\r\n", 10**20, -(10**20)),
    ("ECHO", "", b""),
    tuple(range(300)),  # an array head over the precomputed ones
]


@pytest.mark.parametrize("args", CASES)
def test_packs_as_hiredis_does(args: tuple[str | int | bytes, ...]) -> None:
    assert resp._pack(args) == hiredis_pack(args)
    assert resp._pack(args) == hiredis_pack(args)  # again, from the cache


def test_a_float_goes_to_hiredis() -> None:
    args = ("SET", "k", 1.5)
    assert resp._pack(args) == hiredis_pack(args)  # type: ignore[arg-type]


def test_random_commands_match_and_the_cache_stays_bounded() -> None:
    rng = random.Random(20)

    def arg() -> str | int | bytes:
        kind = rng.randrange(3)
        if kind == 0:
            return rng.randrange(-(10**15), 10**15)
        if kind == 1:
            return "".join(rng.choice("ab\x1f é") for _ in range(rng.randrange(9)))
        return rng.randbytes(rng.randrange(5))

    for _ in range(3000):
        args = tuple(arg() for _ in range(rng.randrange(1, 12)))
        assert resp._pack(args) == hiredis_pack(args)
        assert len(resp._CHUNKS) <= resp._CHUNKS_MAX


@pytest.mark.parametrize("args", CASES[1:])
@pytest.mark.parametrize("cut", [0, 1, 3])
def test_a_packed_tail_packs_as_its_values_in_its_place(
    args: tuple[str | int | bytes, ...], cut: int
) -> None:
    """A Packed last element (a memo entry's constant arguments) stands for its values."""
    head, values = args[:cut], tuple(a for a in args[cut:] if not isinstance(a, bytes))
    assert resp._pack((*head, resp.Packed(values))) == hiredis_pack((*head, *values))


def test_a_packed_tail_after_a_float_and_with_one_in_it() -> None:
    assert resp._pack(("SET", 1.5, resp.Packed(("k", 2)))) == hiredis_pack(  # type: ignore[arg-type]
        ("SET", 1.5, "k", 2)
    )
    assert resp._pack(("SET", resp.Packed(("k", 2.5)))) == hiredis_pack(  # type: ignore[arg-type]
        ("SET", "k", 2.5)
    )
