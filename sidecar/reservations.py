"""What the sidecar writes into a reservation record besides figures: the reservation's
id, the fingerprint its idempotency key is bound to, and the call's ledger tuple (meta,
lua/_lib.lua record field 11), which settle returns and writes to the usage ledger."""

from __future__ import annotations

import hashlib
import os

from sidecar.model import Identity
from sidecar.schemas import AuthorizeRequest

# Reservation ids come from the OS's CSPRNG 4 KiB at a time: one getrandom() call per
# 256 ids instead of one per decision (a syscall costs several microseconds under load on
# a VM; measured with py-spy, 4% of an authorize).
_RANDOM_CHUNK = 4096
_random = bytearray()
_random_at = 0


def _forget_random() -> None:
    # A forked child must not hand out the ids its parent also holds.
    global _random, _random_at
    _random, _random_at = bytearray(), 0


os.register_at_fork(after_in_child=_forget_random)


def _random_hex(n: int) -> str:
    """`n` random bytes in hex, from a chunk of os.urandom read once per many ids (one
    syscall per _RANDOM_CHUNK bytes, not one per id)."""
    global _random, _random_at
    at = _random_at
    if at + n > len(_random):
        _random, at = bytearray(os.urandom(_RANDOM_CHUNK)), 0
    _random_at = at + n
    return _random[at : at + n].hex()


def new_reservation_id() -> str:
    """128 random bits in hex (the ReservationId format)."""
    return _random_hex(16)


def new_attempt_id() -> str:
    """32 random bits in hex: one settle call's id (lua/settle.lua ARGV[14]); it only tells
    apart the few calls that settle one reservation."""
    return _random_hex(4)


# The ledger tuple's separator. Identifiers are validated, so the unit separator cannot
# occur in them (nor '|', the record's own).
SEP = "\x1f"


def meta_head(provider: str | None, model: str | None, identity: Identity) -> str:
    """The ledger tuple's fields that stay the same for one resolved identity."""
    return SEP.join(
        (
            provider or "",
            model or "",
            identity.org_id,
            identity.team_id or "",
            identity.agent_id or "",
            identity.workflow_id or "",
            identity.user_id or "",
        )
    )


def meta(head: str, step_id: str | None, run_id: str | None) -> str:
    # The run last: the daily aggregates leave it out.
    return f"{head}{SEP}{step_id or ''}{SEP}{run_id or ''}"


def unmeta(meta: str) -> tuple[str | None, str | None]:
    provider, model, *_ = (*meta.split(SEP), "")
    return provider or None, model or None


def fingerprint(req: AuthorizeRequest, asked_micro: int) -> str:
    """What an idempotency key is bound to: the request's identity, model, estimate, lease
    and run. A retry of the same request carries the same fingerprint; any other does not."""
    parts = (
        req.org_id,
        req.team_id,
        req.agent_id,
        req.workflow_id,
        req.user_id,
        req.provider,
        req.model,
        asked_micro,
        req.estimated_tokens_in,
        req.estimated_tokens_out,
        req.lease_ms,
        req.run_id,
        req.step_id,
        req.fingerprint,
    )
    text = SEP.join("" if p is None else str(p) for p in parts)
    return hashlib.blake2b(_utf8(text), digest_size=12).hexdigest()


def loop_fingerprint(text: str) -> str:
    """What a loop guard keys on: a hash of the call's fingerprint (the text is never
    stored)."""
    return hashlib.blake2b(_utf8(text), digest_size=8).hexdigest()


def _utf8(text: str) -> bytes:
    # surrogatepass: a header's bytes that are not UTF-8 reach us as lone surrogates
    # (aiohttp decodes with surrogateescape); they hash to bytes no valid text produces.
    return text.encode("utf-8", "surrogatepass")
