"""budget-sidecar: atomic spend and rate limits for AI agents.

`serve` runs the sidecar, `check-config FILE` validates a config file, `hash-secret`
prints the secret_sha256 a client entry needs; `stop`, `stops` and `unstop` make, list and
lift stops through a running sidecar's API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from sidecar import __version__, config, log_throttle, logs, stop_cli
from sidecar.model import Config

log = logging.getLogger("sidecar")


REDIS_URL_FORMS = """\
Redis URL forms (--redis-url / REDIS_URL):
  redis://[:PASSWORD@]HOST[:PORT][/DB]          one server
  rediss://[:PASSWORD@]HOST[:PORT][/DB]         one server over TLS
  unix:///PATH/redis.sock[?db=DB]               one server on a Unix socket
  redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]
                                                Redis Cluster (rediss+cluster:// for TLS);
                                                the nodes given are the seeds
  redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]
                                                the primary Sentinel names SERVICE
                                                (rediss+sentinel:// for TLS)
Without one, serve starts an embedded redis-server that keeps its data in --data-dir:
a single-node setup; replicas share budgets only through a shared Redis."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (the URL table); flags' help says default and env var."""


# flag -> the environment variable that sets its default (filled as the parser is built)
SERVE_ENV: dict[str, str] = {}


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env_name: str,
    default: str | None,
    help_text: str,
    kind: type = str,
) -> None:
    """A flag whose default comes from an environment variable, both named in --help."""
    SERVE_ENV[flag] = env_name
    raw = os.environ.get(env_name, default)
    shown = "none" if default is None else default
    parser.add_argument(
        flag,
        type=kind,
        default=None if raw is None else kind(raw),
        metavar=flag.lstrip("-").upper().replace("-", "_"),
        help=f"{help_text} (env {env_name}; default: {shown})",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budget-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the sidecar",
        description="Serve the budget API on HOST:PORT. Every flag can also be set by the "
        "environment variable named in its help; the flag wins.",
        epilog=REDIS_URL_FORMS,
        formatter_class=_Help,
    )
    _option(serve, "--host", "SIDECAR_HOST", "127.0.0.1", "address to listen on")
    _option(serve, "--port", "SIDECAR_PORT", "8787", "TCP port to listen on", int)
    _option(serve, "--config", "SIDECAR_CONFIG", None, "YAML config file (hot-reloaded)")
    _option(
        serve,
        "--redis-url",
        "REDIS_URL",
        None,
        "Redis to keep counters in, in any form listed below (none: an embedded, "
        "persistent redis-server)",
    )
    _option(
        serve,
        "--data-dir",
        "SIDECAR_DATA_DIR",
        None,
        "where the embedded redis-server keeps its data (none: a per-user data directory)",
    )
    _option(
        serve,
        "--log-level",
        "SIDECAR_LOG_LEVEL",
        "info",
        "debug, info, warning or error (JSON lines on stderr)",
    )
    _option(
        serve,
        "--workers",
        "SIDECAR_WORKERS",
        "1",
        "worker processes sharing the port (SO_REUSEPORT); metrics add up across them",
        int,
    )
    _option(
        serve,
        "--shutdown-timeout",
        "SIDECAR_SHUTDOWN_TIMEOUT",
        "10",
        "seconds requests in flight get to finish after SIGTERM (then they are cut)",
        float,
    )
    _option(
        serve,
        "--drain-seconds",
        "SIDECAR_DRAIN_SECONDS",
        "0",
        "seconds between SIGTERM (/readyz turns 503) and closing the listener, for load "
        "balancers to notice; requests keep being served meanwhile",
        float,
    )
    # Set by the supervisor for its children: bind with SO_REUSEPORT and tag responses.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    check = sub.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate a config file offline. Prints one verdict on stdout: "
        "'ok: ...' and exit 0, or 'invalid: FILE: FIELD: why' and exit 1.",
    )
    check.add_argument("file", metavar="FILE")

    sub.add_parser(
        "hash-secret",
        help="print the secret_sha256 of a client secret",
        description="Read a client secret from stdin (or prompt for it on a terminal) and "
        "print its SHA-256 in hex: the value auth.clients[].secret_sha256 takes. The "
        "client then sends the secret itself (HTTP Basic client_id:secret).",
    )
    stop_cli.add_parsers(sub)
    return parser


def _load_config(path: str | None) -> Config:
    return config.load(path) if path else Config()


class Fatal:
    """A failure found off the event loop (the embedded Redis cannot be restarted): the
    sidecar reports itself broken on /healthz and exits non-zero."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._wake: Callable[[], object] | None = None

    def set(self, reason: str) -> None:
        self.reason = reason
        if self._wake is not None:
            self._wake()

    def on_set(self, wake: Callable[[], object]) -> None:
        """`wake` is called (from any thread) when set, at once if it already is."""
        self._wake = wake
        if self.reason is not None:
            wake()


def _address_in_use(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound, or None: checked before anything starts, so that
    a port in use is one line and nothing else (aiohttp binds with SO_REUSEADDR too)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return str(exc)
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _listen_error(args: argparse.Namespace, reason: str) -> int:
    log.error("cannot listen on http://%s:%d: %s", args.host, args.port, reason)
    return 1


def serve(args: argparse.Namespace) -> int:
    try:
        cfg = _load_config(args.config)
    except config.ConfigError as err:
        log.error("refusing to start: config %s", err)
        return 2
    if args.workers < 1:
        log.error("refusing to start: --workers must be at least 1")
        return 2
    # A worker binds with SO_REUSEPORT beside its siblings: only the parent checks.
    if args.worker_index is None and (busy := _address_in_use(args.host, args.port)):
        return _listen_error(args, busy)

    from sidecar.embedded import EmbeddedError, EmbeddedRedis, default_data_dir
    from sidecar.store import masked_url

    fatal = Fatal()
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        # Started once, here: with several workers they all share this one server.
        embedded = EmbeddedRedis(
            Path(args.data_dir) if args.data_dir else default_data_dir(), on_failure=fatal.set
        )
        try:
            embedded.start()
        except EmbeddedError as exc:
            log.error("refusing to start: %s", exc)
            return 1
        redis_url = embedded.url
        log.info(
            "started embedded redis-server %s (Redis %s, pid %s); data in %s, supervised "
            "(restarted if it dies). This is a single-node setup: set REDIS_URL to a shared "
            "Redis so that replicas share budgets.",
            embedded.binary,
            ".".join(map(str, embedded.version or ())),
            embedded.pid,
            embedded.data_dir,
        )
    startup = (
        f"budget-sidecar {__version__} listening on http://{args.host}:{args.port} "
        f"(redis: {masked_url(redis_url)}; config: {cfg.source}; {len(cfg.budgets)} budgets, "
        f"{len(cfg.pricing)} prices; {args.workers} worker{'' if args.workers == 1 else 's'})"
    )
    try:
        if args.workers == 1:
            return _serve_one(args, cfg, redis_url, startup, fatal)
        log.info("%s", startup)
        return _supervise(args, redis_url, fatal)
    finally:
        if embedded is not None:
            embedded.stop()


def _serve_one(
    args: argparse.Namespace, cfg: Config, redis_url: str, startup: str, fatal: Fatal
) -> int:
    """One event loop serving the app until SIGTERM or SIGINT, then a graceful stop."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        log.warning("uvloop not available; using the default event loop")
    return asyncio.run(_run_app(args, cfg, redis_url, startup, fatal))


async def _run_app(
    args: argparse.Namespace, cfg: Config, redis_url: str, startup: str, fatal: Fatal
) -> int:
    from sidecar.api.app import ENGINE, LIFECYCLE, create_app
    from sidecar.metrics import Metrics
    from sidecar.reload import ConfigWatcher
    from sidecar.store import masked_url, open_store

    _descriptors_for(cfg.settings.max_connections)
    metrics = Metrics()
    store = metrics.wrap(open_store(redis_url, timeout_ms=cfg.settings.redis_timeout_ms))
    app = create_app(cfg, store, events=metrics, listen_host=args.host)
    if args.config:
        watcher = ConfigWatcher(args.config, app[ENGINE], on_result=metrics.config_reloaded)
        app.cleanup_ctx.append(watcher.lifecycle)
    if args.worker_index is not None:
        # Which worker answered: lets operators (and the tests) see the port is shared.
        worker = str(os.getpid())

        async def tag(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-Sidecar-Worker"] = worker

        app.on_response_prepare.append(tag)

    async def freeze_gc(app: web.Application) -> None:
        # Everything allocated at start-up lives for the whole run; moving it out of
        # the collector's generations keeps full collections (the p99) short.
        gc.collect()
        gc.freeze()

    app.on_startup.append(freeze_gc)

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=args.shutdown_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def broken() -> None:
        app[LIFECYCLE].broken = fatal.reason
        stop.set()

    fatal.on_set(lambda: loop.call_soon_threadsafe(broken))
    try:
        site = web.TCPSite(runner, args.host, args.port, reuse_port=args.worker_index is not None)
        try:
            await site.start()
        except OSError as exc:
            return _listen_error(args, exc.strerror or str(exc))
        if args.worker_index is not None:
            log.info("worker %d (pid %d) serving", args.worker_index, os.getpid())
        else:
            log.info("%s", startup)
        if (unreachable := await _unreachable(store.client)) is not None:
            log.warning(
                "redis at %s is unreachable (%s): decisions answer by the fail mode until "
                "it answers, /readyz answers 503",
                masked_url(redis_url),
                unreachable,
            )
        await stop.wait()
        # Unready first, so that probes and load balancers stop sending new work; then
        # stop listening and give requests in flight the shutdown timeout to finish.
        # Redis stays open until they have: a hold they take is answered, and settles.
        app[LIFECYCLE].draining = True
        if fatal.reason is not None:
            log.error("stopping: %s", fatal.reason)
        log.info(
            "stopping: /readyz answers 503; requests in flight get %.1f s to finish",
            args.drain_seconds + args.shutdown_timeout,
        )
        if args.drain_seconds > 0:
            # A second signal ends the drain early (an operator who does not want to wait).
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.drain_seconds)
    finally:
        await runner.cleanup()
    return 1 if fatal.reason is not None else 0


def _descriptors_for(connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard one (as Go's runtime does at start),
    to what `connections` and the descriptors kept beside them need; say so when the
    limit still holds the connections below `connections` (settings.max_connections)."""
    import resource

    from sidecar.api.connection import RESERVED_FDS, descriptor_bound

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if raised > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
    bound = descriptor_bound()
    if bound is not None and bound < connections:
        log.warning(
            "RLIMIT_NOFILE is %d (hard limit %d): at most %d client connections at once, "
            "not settings.max_connections %d (%d descriptors are kept for Redis and files)",
            soft,
            hard,
            bound,
            connections,
            RESERVED_FDS,
        )


async def _unreachable(client: Any) -> str | None:
    """Why Redis does not answer a PING at start-up, or None when it does."""
    try:
        async with asyncio.timeout(2.0):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _supervise(args: argparse.Namespace, redis_url: str, fatal: Fatal) -> int:
    """Run `args.workers` children on one port (SO_REUSEPORT) and stop them all together.

    A child that dies is restarted; one that dies within a few seconds of starting (a bad
    port, a Redis that refuses it) stops everything, rather than restarting in a loop.
    """
    env = dict(os.environ)
    own_metrics_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client sums the workers' per-process files in this directory.
        own_metrics_dir = tempfile.mkdtemp(prefix="budget-sidecar-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]

    def child_cmd(index: int) -> list[str]:
        cmd = [sys.executable, "-m", "sidecar", "serve", "--workers", "1"]
        cmd += ["--host", args.host, "--port", str(args.port), "--redis-url", redis_url]
        cmd += ["--log-level", args.log_level, "--worker-index", str(index)]
        cmd += ["--shutdown-timeout", str(args.shutdown_timeout)]
        cmd += ["--drain-seconds", str(args.drain_seconds)]
        if args.config:
            cmd += ["--config", args.config]
        return cmd

    stopping = False

    children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # a second signal: pass it on (it ends the workers' drain)
            for proc, _ in list(children.values()):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for index in range(args.workers):
            children[index] = (subprocess.Popen(child_cmd(index), env=env), time.monotonic())
        while not stopping:
            time.sleep(0.2)
            if fatal.reason is not None:
                log.error("stopping: %s", fatal.reason)
                stopping, status = True, 1
                break
            for index, (proc, started) in list(children.items()):
                code = proc.poll()
                if code is None or stopping:
                    continue
                _forget(metrics_dir, proc.pid)
                if time.monotonic() - started < 5.0:
                    log.error("worker %d exited with %d at start-up; stopping", index, code)
                    stopping, status = True, 1
                    break
                log.warning("worker %d (pid %d) exited with %d; restarting", index, proc.pid, code)
                children[index] = (subprocess.Popen(child_cmd(index), env=env), time.monotonic())
    finally:
        for proc, _ in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + args.drain_seconds + args.shutdown_timeout + 5.0
        for proc, _ in children.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return status


def _forget(metrics_dir: str, pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sum)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def check_config(args: argparse.Namespace) -> int:
    """One verdict, on stdout, whatever it is; the exit code says which (0 ok, 1 invalid;
    2 is argparse's, for a command line it cannot read)."""
    try:
        cfg = config.load(args.file)
    except config.ConfigError as err:
        print(f"invalid: {err}")
        return 1
    print(
        f"ok: {args.file}: {len(cfg.budgets)} budgets, {len(cfg.rate_limits)} rate limits, "
        f"{len(cfg.pricing)} prices"
    )
    return 0


def hash_secret() -> int:
    """Print SHA-256(secret) in hex. The secret is read whole from stdin, less one trailing
    newline (what `echo` and a here-string add); on a terminal it is asked for twice."""
    if sys.stdin.isatty():
        import getpass

        secret = getpass.getpass("client secret: ")
        if getpass.getpass("again: ") != secret:
            print("invalid: the two secrets differ", file=sys.stderr)
            return 1
    else:
        secret = sys.stdin.read()
        secret = secret[:-1] if secret.endswith("\n") else secret
        secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        print("invalid: the secret is empty", file=sys.stderr)
        return 1
    print(hashlib.sha256(secret.encode("utf-8")).hexdigest())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logs.setup(args.log_level)
        log_throttle.install()
        return serve(args)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    if args.command == "hash-secret":
        return hash_secret()
    if args.command in ("stop", "stops", "unstop"):
        return stop_cli.run(args)
    return check_config(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
