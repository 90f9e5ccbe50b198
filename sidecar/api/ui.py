"""The status page: one static HTML file (sidecar/api/ui.html, inline CSS and JS, no
build step, no external asset) at `/` and `/ui`.

The page holds no data. Its script fetches the JSON read routes (budgets, status, rate
limits, alerts, usage breakdown) every few seconds, with the credential entered on the
page (kept in the tab's sessionStorage) once the sidecar asks for one: the page itself is
open, the data behind it follows the read API's credentials (sidecar.api.auth).
"""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

PATHS = ("/", "/ui")
# Nothing but this origin: a page that loads no script, style or image from elsewhere and
# sends the credential to no other host.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page() -> bytes:
    return files("sidecar.api").joinpath("ui.html").read_bytes()


def add_routes(app: web.Application) -> None:
    body = page()  # read once: the page is static

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=_HEADERS)

    for path in PATHS:
        app.router.add_get(path, handle)
