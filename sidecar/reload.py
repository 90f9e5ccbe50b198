"""Config hot reload: poll the config file and swap the engine's definitions on change.

Kubernetes updates a mounted ConfigMap by writing a new timestamped directory and swapping
the `..data` symlink, so the file's own path never changes: an inotify watch on the file
would miss it. Polling os.stat() of the path (which follows every symlink) sees both a
swap (new inode) and an in-place edit (new mtime or size), costs one syscall per tick,
and needs no dependency.

A change is loaded once the file has looked the same for one tick, so a file caught
halfway through being written is not reported as broken. A file that fails to load
keeps the last good config: the error names the file and the field, and the failure is
counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from sidecar import config as config_mod
from sidecar import tasks
from sidecar.engine import Engine

log = logging.getLogger("sidecar.reload")

Signature = tuple[int, int, int, int] | None


def signature(path: Path) -> Signature:
    """(device, inode, mtime_ns, size) of what the path resolves to; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class ConfigWatcher:
    """Reloads `path` into `engine` when it changes; `on_result(ok)` counts reloads."""

    def __init__(
        self,
        path: str | Path,
        engine: Engine,
        *,
        interval_s: float = 0.25,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.engine = engine
        self.interval_s = interval_s
        self.on_result = on_result
        self._loaded = signature(self.path)  # what the engine's config was read from
        self._seen = self._loaded

    async def check(self) -> bool | None:
        """One tick: None if nothing to do, else whether a reload succeeded."""
        current = signature(self.path)
        previous, self._seen = self._seen, current
        if current == self._loaded or current != previous:
            return None  # unchanged, or still changing: look again next tick
        self._loaded = current
        try:
            # Parsing a large file takes milliseconds: keep it off the event loop.
            new = await asyncio.to_thread(config_mod.load, self.path)
        except config_mod.ConfigError as err:
            log.error(
                "config reload failed; keeping the last good config: %s",
                err,
                extra={"file": err.source, "field": err.path, "error": err.message},
            )
            self._report(False)
            return False
        self.engine.swap(new)
        log.info(
            "config reloaded from %s: %d budgets, %d prices",
            self.path,
            len(new.budgets),
            len(new.pricing),
            extra={"file": str(self.path)},
        )
        self._report(True)
        return True

    def _report(self, ok: bool) -> None:
        if self.on_result is not None:
            self.on_result(ok)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a watcher that dies silently would be worse
                log.exception("config watcher error")

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """For app.cleanup_ctx: watch while the app runs."""
        task = asyncio.get_running_loop().create_task(self.run())
        yield
        await tasks.stop([task], what="config watcher")
