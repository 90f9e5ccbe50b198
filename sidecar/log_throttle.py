"""Repeated Redis warnings, logged without flooding.

A Redis that stays unreachable makes the definitions poll warn every half second for as
long as it lasts (webhook delivery throttles its own). A warning of a throttled logger with
the same message template as one logged less than `every_s` ago is dropped and counted;
the next one let through says how many were dropped. Other loggers are left alone (a
webhook's failed attempts are events of their own, one per alert), and so are errors and
warnings with a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EVERY_S = 10.0
# The loggers of loops that retry Redis on a fixed period.
LOGGERS = frozenset({"sidecar.definitions", "sidecar.fail_open"})


class Throttle(logging.Filter):
    def __init__(
        self,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        loggers: frozenset[str] = LOGGERS,
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self.loggers = loggers
        self._clock = clock
        # (logger, template) -> (when last let through, dropped since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in self.loggers or record.levelno != logging.WARNING:
            return True
        if record.exc_info:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            # Formatted now, so that the note follows the message in any handler format.
            note = f"{last[1]} similar suppressed in the last {now - last[0]:.0f} s"
            record.msg = f"{record.getMessage()} ({note})"
            record.args = None
        return True


def install(every_s: float = EVERY_S) -> None:
    """Throttle every handler of the root logger (call after logging is set up); each its
    own counts, since a filter may rewrite the record it lets through."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(Throttle(every_s))
