"""`budget-sidecar serve` and `budget-sidecar check-config FILE`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from sidecar import __version__, config, logs
from sidecar.model import Config

log = logging.getLogger("sidecar")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="budget-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--host", default=env("SIDECAR_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env("SIDECAR_PORT", "8787")))
    serve.add_argument("--config", default=env("SIDECAR_CONFIG"), help="YAML budgets file")
    serve.add_argument(
        "--redis-url",
        default=env("REDIS_URL"),
        help="redis://, rediss:// or unix:// (default: an embedded, persistent redis-server)",
    )
    serve.add_argument(
        "--data-dir",
        default=env("SIDECAR_DATA_DIR"),
        help="where the embedded redis-server keeps its data",
    )
    serve.add_argument("--log-level", default=env("SIDECAR_LOG_LEVEL", "info"))

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    return parser


def _load_config(path: str | None) -> Config:
    return config.load(path) if path else Config()


def serve(args: argparse.Namespace) -> int:
    from sidecar.api.app import ENGINE, create_app
    from sidecar.embedded import EmbeddedRedis, default_data_dir
    from sidecar.metrics import Metrics
    from sidecar.reload import ConfigWatcher
    from sidecar.store import RedisStore

    try:
        cfg = _load_config(args.config)
    except config.ConfigError as err:
        log.error("refusing to start: config %s", err)
        return 2

    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(args.data_dir) if args.data_dir else default_data_dir())
        started = embedded.start()
        redis_url = embedded.url
        log.info(
            "%s embedded redis-server%s; data in %s. This is a single-node setup: set "
            "REDIS_URL to a shared Redis so that replicas share budgets.",
            "started" if started else "reusing",
            f" ({embedded.binary})" if embedded.binary else "",
            embedded.data_dir,
        )

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        log.warning("uvloop not available; using the default event loop")

    async def make_app() -> web.Application:
        metrics = Metrics()
        store = metrics.wrap(
            RedisStore.from_url(redis_url, timeout_ms=cfg.settings.redis_timeout_ms)
        )
        app = create_app(cfg, store, events=metrics)
        if args.config:
            watcher = ConfigWatcher(args.config, app[ENGINE], on_result=metrics.config_reloaded)
            app.cleanup_ctx.append(watcher.lifecycle)

        async def freeze_gc(app: web.Application) -> None:
            # Everything allocated at start-up lives for the whole run; moving it out of
            # the collector's generations keeps full collections (the p99) short.
            gc.collect()
            gc.freeze()

        app.on_startup.append(freeze_gc)
        return app

    log.info(
        "budget-sidecar %s listening on http://%s:%d (config: %s; %d budgets, %d prices)",
        __version__,
        args.host,
        args.port,
        cfg.source,
        len(cfg.budgets),
        len(cfg.pricing),
    )
    try:
        web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.file)
    except config.ConfigError as err:
        print(f"invalid: {err}", file=sys.stderr)
        return 2
    print(
        f"ok: {args.file}: {len(cfg.budgets)} budgets, {len(cfg.rate_limits)} rate limits, "
        f"{len(cfg.pricing)} prices"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logs.setup(args.log_level)
        return serve(args)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    return check_config(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
