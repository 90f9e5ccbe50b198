"""The bare baselines: aiohttp on uvloop decoding the same authorize body with msgspec and
encoding a decision, with no Redis (the sidecar's ceiling on this machine); with
--redis-url, the same plus one EVALSHA of a script that returns at once, sent over the
sidecar's own pipelined connection (the floor a decision through Redis costs before any
budget logic)."""

from __future__ import annotations

import argparse
import asyncio
import gc

import msgspec
import uvloop
from aiohttp import web

from sidecar.resp import PipelinedConnection
from sidecar.schemas import AuthorizeRequest, Decision

_decode = msgspec.json.Decoder(AuthorizeRequest).decode
_encode = msgspec.json.Encoder().encode
_RETURN_AT_ONCE = "return 1"
CONNECTION = web.AppKey("redis", PipelinedConnection)
EVALSHA = web.AppKey("evalsha", tuple)


def _answer(req: AuthorizeRequest) -> web.Response:
    decision = Decision(allowed=True, action="allow", reservation_id=req.idempotency_key or "r")
    return web.Response(body=_encode(decision), content_type="application/json")


async def authorize(request: web.Request) -> web.Response:
    return _answer(_decode(await request.read()))


async def authorize_through_redis(request: web.Request) -> web.Response:
    req = _decode(await request.read())
    reply = await request.app[CONNECTION].call(request.app[EVALSHA])
    if reply != 1:  # a 500 that wrk counts: a broken baseline must not read as a fast one
        raise RuntimeError(f"EVALSHA answered {reply!r}")
    return _answer(req)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", help="also make one EVALSHA per request")
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application()
    app.router.add_post("/v1/authorize", authorize_through_redis if args.redis_url else authorize)

    async def start(app: web.Application) -> None:
        if args.redis_url:
            conn = PipelinedConnection(args.redis_url, timeout_s=1.0)
            sha = await conn.execute("SCRIPT", "LOAD", _RETURN_AT_ONCE)
            app[CONNECTION] = conn
            app[EVALSHA] = ("EVALSHA", sha, 0)
        gc.collect()
        gc.freeze()

    async def stop(app: web.Application) -> None:
        if CONNECTION in app:
            await app[CONNECTION].close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
