"""The bare baseline: aiohttp on uvloop decoding the same authorize body with msgspec and
encoding a decision, with no Redis. The sidecar's ceiling on this machine."""

from __future__ import annotations

import argparse
import asyncio
import gc

import msgspec
import uvloop
from aiohttp import web

from sidecar.schemas import AuthorizeRequest, Decision

_decode = msgspec.json.Decoder(AuthorizeRequest).decode
_encode = msgspec.json.Encoder().encode


async def authorize(request: web.Request) -> web.Response:
    req = _decode(await request.read())
    decision = Decision(allowed=True, action="allow", reservation_id=req.idempotency_key or "r")
    return web.Response(body=_encode(decision), content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application()
    app.router.add_post("/v1/authorize", authorize)

    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()

    app.on_startup.append(freeze)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
