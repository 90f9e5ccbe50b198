"""The `proxy` section of the config file: defaults, route matching, and strict errors that
name the field."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from sidecar import config as config_mod
from sidecar.config import ConfigError
from sidecar.proxy_config import ProxyHeaders, ProxySpec
from tests.harness import REPO


def parse(proxy: Any) -> ProxySpec:
    return config_mod.parse({"proxy": proxy}, "p.yaml").proxy


def test_defaults() -> None:
    spec = config_mod.parse({}, "p.yaml").proxy
    assert spec == ProxySpec()
    assert (spec.deny_status, spec.default_estimate_usd, spec.lease_ms, spec.routes) == (
        429,
        0.01,
        None,
        (),
    )
    h = spec.headers
    assert (h.org_id, h.team_id, h.agent_id, h.workflow_id, h.user_id) == (
        "x-org-id",
        "x-team-id",
        "x-agent-id",
        "x-workflow-id",
        "x-user-id",
    )
    assert (h.model, h.provider, h.estimate_usd, h.request_id) == (
        "x-model",
        "x-provider",
        "x-budget-estimate-usd",
        "x-request-id",
    )
    # Safe for Envoy: no header is trusted for the URI or method, so a client's
    # X-Original-URI is never read; OPTIONS passes with nothing held.
    assert (spec.trusted.uri_header, spec.trusted.method_header) == (None, None)
    assert spec.pass_methods == ("OPTIONS",)
    assert spec.unsettled == "charge"
    assert h.original_uri is None


def test_the_longest_matching_prefix_wins() -> None:
    spec = parse(
        {
            "routes": [
                {"prefix": "/", "defaults": {"model": "a"}},
                {"prefix": "/v1/chat", "defaults": {"model": "c"}},
                {"prefix": "/v1", "defaults": {"model": "b"}},
            ]
        }
    )
    assert [
        getattr(spec.route(p), "model", None) for p in ("/x", "/v1/e", "/v1/chat/c", "/v1/chat")
    ] == ["a", "b", "c", "c"]
    assert parse({"routes": [{"prefix": "/v1"}]}).route("/v2") is None


@pytest.mark.parametrize(
    ("proxy", "path", "message"),
    [
        ({"bogus": 1}, "$.proxy.bogus", "unknown field"),
        ({"deny_status": 500}, "$.proxy.deny_status", "Invalid enum value 500"),
        ({"deny_status": "429"}, "$.proxy.deny_status", "Expected `int`"),
        ({"default_estimate_usd": -0.5}, "$.proxy.default_estimate_usd", ">= 0"),
        ({"lease_ms": 10}, "$.proxy.lease_ms", ">= 100"),
        ({"headers": {"org_id": "X Org"}}, "$.proxy.headers.org_id", "matching regex"),
        ({"headers": {"org-id": "x-org"}}, "$.proxy.headers.org-id", "unknown field"),
        ({"headers": {"model": "x-org-id"}}, "$.proxy.headers.model", "already used by org_id"),
        (
            {"headers": {"original_uri": ["x-original-uri", "x-forwarded-uri"]}},
            "$.proxy.headers.original_uri",
            "replaced by proxy.trusted.uri_header",
        ),
        (
            {"trusted": {"uri_header": "x-user-id"}},
            "$.proxy.trusted",
            "uri_header: header 'x-user-id' is already used by user_id",
        ),
        (
            {"trusted": {"uri_header": "x-u", "method_header": "x-u"}},
            "$.proxy.trusted",
            "method_header: header 'x-u' is already used by uri_header",
        ),
        ({"trusted": {"uri_header": "X-Forwarded-Uri"}}, "$.proxy.trusted.uri_header", "regex"),
        ({"trusted": {"uri_headers": "x"}}, "$.proxy.trusted.uri_headers", "unknown field"),
        ({"unsettled": "keep"}, "$.proxy.unsettled", "Invalid enum value 'keep'"),
        (
            {"routes": [{"prefix": "/a", "unsettled": "x"}]},
            "$.proxy.routes[0].unsettled",
            "Invalid enum value 'x'",
        ),
        ({"pass_methods": ["options"]}, "$.proxy.pass_methods[0]", "matching regex"),
        (
            {"routes": [{"prefix": "/a", "methods": ["get"]}]},
            "$.proxy.routes[0].methods[0]",
            "regex",
        ),
        ({"routes": [{"prefix": "/a", "hold": "no"}]}, "$.proxy.routes[0].hold", "Expected `bool`"),
        (
            {
                "routes": [
                    {"prefix": "/a", "methods": ["GET", "PUT"]},
                    {"prefix": "/a", "methods": ["PUT"]},
                ]
            },
            "$.proxy.routes",
            "duplicate prefix '/a' (routes[1])",
        ),
        ({"routes": [{"prefix": "v1"}]}, "$.proxy.routes[0].prefix", "matching regex"),
        ({"routes": [{"prefix": "/a", "extra": 1}]}, "$.proxy.routes[0].extra", "unknown"),
        (
            {"routes": [{"prefix": "/a", "defaults": {"org_id": "a:b"}}]},
            "$.proxy.routes[0].defaults.org_id",
            "expected letters, digits and . _ ~ @ + - only",  # the pattern in words
        ),
        (
            {"routes": [{"prefix": "/a", "defaults": {"estimated_usd": -1}}]},
            "$.proxy.routes[0].defaults.estimated_usd",
            ">= 0",
        ),
        (
            {"routes": [{"prefix": "/a"}, {"prefix": "/a"}]},
            "$.proxy.routes",
            "duplicate prefix '/a' (routes[1])",
        ),
    ],
)
def test_bad_proxy_config_names_the_field(proxy: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(proxy)
    assert info.value.source == "p.yaml"
    assert info.value.path == path
    assert message in info.value.message


def test_one_prefix_may_have_a_route_per_method_and_one_for_the_rest() -> None:
    spec = parse(
        {
            "routes": [
                {"prefix": "/a", "defaults": {"model": "any"}},
                {"prefix": "/a", "methods": ["GET"], "defaults": {"model": "get"}},
                {"prefix": "/a/b", "methods": ["PUT"], "defaults": {"model": "put"}},
            ]
        }
    )
    assert [getattr(spec.route("/a/b", m), "model", None) for m in ("POST", "GET", "PUT")] == [
        "any",
        "get",
        "put",
    ]
    assert spec.passes("/a", "OPTIONS") and not spec.passes("/a", "POST")


def test_headers_given_in_any_case_are_refused_not_lowered() -> None:
    # Header lookups ignore case, but the file says what the proxy must forward: Envoy's
    # allowed_headers patterns are matched lower-case, so the file must be too.
    with pytest.raises(ConfigError) as info:
        parse({"headers": {"user_id": "X-User"}})
    assert info.value.path == "$.proxy.headers.user_id"
    assert ProxyHeaders(user_id="x-user").user_id == "x-user"


def test_the_readme_example_parses() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Proxies", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```yaml\n(.*?)```", section, re.S)
    spec = config_mod.parse(yaml.safe_load(block), "README").proxy
    assert (spec.deny_status, spec.lease_ms, len(spec.routes)) == (429, 120000, 4)
    assert spec.trusted.uri_header == "x-forwarded-uri"
    chat = spec.route("/v1/chat/completions")
    assert chat is not None and chat.model == "gpt-4o"
    get = spec.route("/v1/chat/completions", "GET")
    assert get is not None and get.estimated_usd == 0.001
    assert spec.passes("/v1/models", "POST") and spec.passes("/v1/chat", "OPTIONS")
