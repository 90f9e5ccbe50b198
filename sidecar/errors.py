"""What an operation answers instead of a result: the request cannot be served as asked
(400/404/409), or Redis is out of reach with the fail mode closed (503)."""

from __future__ import annotations


class RequestError(Exception):
    """The request is well-formed but cannot be served as asked (HTTP 400 or 404)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class IdempotencyConflict(RequestError):
    """An idempotency key names a reservation this request may not be handed: one made by
    a different request, or one no longer held (HTTP 409). Nothing changed."""

    def __init__(self, reservation_id: str, state: str, *, reused: bool) -> None:
        held = {"H": "held", "E": "expired", "S": "settled", "R": "released"}.get(state, state)
        if reused:
            # Not the reservation's id: keys are often guessable, and the id is what
            # settles and releases a hold; a request that is not the key's own must not
            # learn it (the same request gets it back, replayed or as below).
            message = f"already used by another request ({held}): use a new key for a new call"
        else:
            message = (
                f"its reservation {reservation_id} is {held}, no longer held: a new call "
                "needs a new key"
            )
        super().__init__("idempotency_key", message, status=409)
        self.reservation_id = reservation_id


class Unavailable(Exception):
    """Redis is unreachable and the fail mode is closed (HTTP 503)."""
