"""Schemathesis over the gateway's own OpenAPI schema, against the live server of test_gateway_api: whatever it
sends (boundary values, wrong types, unexpected methods), the answer is never a 5xx, and every error is
OpenAI-shaped. Generated token budgets are capped so the run stays short on CPU."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings

from lkserve.gateway import create_app
from tests.test_gateway_api import ADMIN_KEY, API_KEY, live  # noqa: F401 - live: the fixture

SCHEMA = schemathesis.openapi.from_dict(create_app(None).openapi())


def _cheap(case) -> None:
    """Keep generated requests small on CPU: valid token budgets are capped (invalid ones are kept as they are)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and 4 < v <= 512:
            body[name] = 4
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 8:
        body["n"] = 2
    if case.path == "/v1/chat/completions" and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    if case.path == "/v1/completions" and "max_tokens" in body and body["max_tokens"] is None:
        body["max_tokens"] = 4


@SCHEMA.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_schemathesis_no_server_errors(case, live):  # noqa: F811 - the imported fixture
    _cheap(case)
    key = ADMIN_KEY if case.path.startswith("/admin") else API_KEY
    resp = case.call(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text[:500])
    if resp.status_code >= 400 and resp.status_code != 499:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
