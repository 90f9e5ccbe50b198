"""`budget-sidecar stop | stops | unstop`: the stop switch from a shell, through a running
sidecar's HTTP API (/v1/stops), so the stop is the same one every replica reads.

Where and as whom: --url (env SIDECAR_URL, default http://127.0.0.1:8787), and once
credentials are configured --client-id/--secret (env SIDECAR_CLIENT_ID,
SIDECAR_CLIENT_SECRET) of an admin client (HTTP Basic, as the SDK sends them).

Output: the API's JSON on stdout (`stops` one stop a line), exit 0; an error answer's
detail on stderr and exit 1; an unreachable sidecar exit 3 (2 is argparse's).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from sidecar.model import Scope

DEFAULT_URL = "http://127.0.0.1:8787"
TIMEOUT_S = 10.0
UNREACHABLE = 3


def add_parsers(sub: Any) -> None:
    """The three commands, on the top-level parser's subparsers."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=os.environ.get("SIDECAR_URL", DEFAULT_URL),
            help=f"the sidecar's base URL (env SIDECAR_URL; default: {DEFAULT_URL})",
        )
        parser.add_argument(
            "--client-id",
            default=os.environ.get("SIDECAR_CLIENT_ID"),
            help="an admin client's id, once clients are configured (env SIDECAR_CLIENT_ID)",
        )
        parser.add_argument(
            "--secret",
            default=os.environ.get("SIDECAR_CLIENT_SECRET"),
            help="that client's secret (env SIDECAR_CLIENT_SECRET; prefer the variable: "
            "a flag shows in the process list)",
        )

    stop = sub.add_parser(
        "stop",
        help="stop every decision of an entity, on every replica",
        description="POST /v1/stops: from the next decision on, every call of the entity "
        "(and of what lies below it) is denied, with the reason. Prints the stop.",
    )
    stop.add_argument("--scope", required=True, choices=[s.value for s in Scope])
    stop.add_argument("--id", required=True, dest="scope_id", help="the entity's id")
    stop.add_argument("--reason", required=True, help="shown in every denial (<= 500 chars)")
    stop.add_argument("--ttl", type=int, default=None, help="seconds until it ends by itself")
    common(stop)
    listing = sub.add_parser("stops", help="list the stops in force (GET /v1/stops)")
    common(listing)
    unstop = sub.add_parser("unstop", help="lift a stop (DELETE /v1/stops/ID)")
    unstop.add_argument("stop_id", metavar="ID")
    common(unstop)


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "stop":
            body: dict[str, Any] = {
                "scope": args.scope, "scope_id": args.scope_id, "reason": args.reason,
            }  # fmt: skip
            if args.ttl is not None:
                body["ttl_s"] = args.ttl
            print(json.dumps(_call(args, "POST", "/v1/stops", body)))
        elif args.command == "stops":
            path = "/v1/stops"
            while True:  # every page (a tenant may have more stops than one holds)
                page = _call(args, "GET", path)
                for stop in page["stops"]:
                    print(json.dumps(stop))
                if not page.get("next_cursor"):
                    break
                path = "/v1/stops?cursor=" + quote(page["next_cursor"], safe="")
        else:
            _call(args, "DELETE", "/v1/stops/" + quote(args.stop_id, safe=""))
            print(f"lifted {args.stop_id}")
    except _Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # urllib.error.URLError included: nothing answered
        print(f"error: cannot reach {args.url}: {err}", file=sys.stderr)
        return UNREACHABLE
    return 0


class _Refused(Exception):
    """The sidecar answered with an error (problem+json)."""


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if args.client_id:
        token = f"{args.client_id}:{args.secret or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        args.url.rstrip("/") + path, data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            detail = json.loads(text).get("detail", text)
        except (ValueError, AttributeError):
            detail = text
        raise _Refused(f"HTTP {err.code}: {detail}") from None
    return json.loads(raw) if raw else None
