"""Stopping background tasks for certain.

A single `task.cancel()` does not always end a task on Python 3.11: asyncio.wait_for
(which redis-py wraps around every command when a socket timeout is set) returns the
command's result instead of raising CancelledError when the command completes in the
same loop tick as the cancellation. A loop like `while True: await poll(); await
sleep()` then carries on, and a shutdown that awaits it waits forever. CI hung for its
whole 90 minutes in a test's app cleanup, where the definitions watcher was stopped that
way; tests/test_tasks.py reproduces that hang within a few stops.

So every background task the sidecar starts is stopped through `stop()`, which cancels
again until the task ends, and gives up after a bound rather than hang a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("budget_sidecar.tasks")

# How often a task that survived cancel() is cancelled again.
RECANCEL_EVERY_S = 0.1


async def stop(tasks: Iterable[asyncio.Task[Any]], *, what: str, bound_s: float = 5.0) -> None:
    """Cancel `tasks` and wait until they have ended, cancelling again every
    RECANCEL_EVERY_S while any runs. After `bound_s` it logs an error naming `what` and
    returns, leaving the survivors to the event loop's own shutdown.

    Exceptions the tasks ended with are retrieved (so asyncio does not log them as never
    retrieved); whoever needs them reads them from the tasks."""
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    running = {t for t in tasks if not t.done()}
    while running and loop.time() < deadline:
        for task in running:
            task.cancel()
        _done, running = await asyncio.wait(running, timeout=RECANCEL_EVERY_S)
    if running:
        log.error("%d %s did not stop within %g s", len(running), what, bound_s)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
