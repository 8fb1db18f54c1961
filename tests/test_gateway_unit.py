"""Gateway pieces that need no engine: error shapes for bad input, auth, the admission queue, announcements.

Requests go in-process through httpx's ASGI transport to an app built without an engine: everything here is
rejected before a handler would touch it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lkserve.config import GatewaySettings, Settings
from lkserve.gateway import create_app
from lkserve.gateway.admission import Admission
from lkserve.gateway.draft_updates import Announcement
from lkserve.gateway.errors import APIError

KEY, ADMIN = "sk-unit-1234567890", "admin-unit-1234567890"


def _app(**gw):
    return create_app(None, Settings(gateway=GatewaySettings(**gw)))


def _request(app, method, path, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def assert_error(resp: httpx.Response, status: int, param: str | None = "__any__", code: str | None = "__any__"):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def open_app():
    return _app()


BAD_COMPLETIONS = [
    # (body, param)
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -5}, "top_k"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 1000}, "n"),
    ({"prompt": "hi", "stop": ["a"] * 100}, "stop"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "seed": 2**70}, "seed"),
    ({"prompt": "hi", "stream": "yes please"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [-1, 2]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "lkserve": {"capture": "nope"}}, "lkserve.capture"),
    ({"prompt": "hi", "lkserve": {"tags": {"bad key!": "x"}}}, "lkserve.tags.bad key!"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[str(b) for b, _ in BAD_COMPLETIONS])
def test_completions_bad_input_is_400_with_param(open_app, body, param):
    err = assert_error(_request(open_app, "POST", "/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[str(b) for b, _ in BAD_CHAT])
def test_chat_bad_input_is_400_with_param(open_app, body, param):
    err = assert_error(_request(open_app, "POST", "/v1/chat/completions", json=body), 400)
    assert err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a string"', b"null", b"\xff\xfe"])
def test_malformed_json_is_400(open_app, raw):
    resp = _request(open_app, "POST", "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 400)


def test_form_body_is_400(open_app):
    assert_error(_request(open_app, "POST", "/v1/chat/completions", data={"messages": "x"}), 400)


def test_unknown_route_and_method(open_app):
    assert_error(_request(open_app, "GET", "/v1/nope"), 404, code="not_found")
    assert_error(_request(open_app, "GET", "/v1/completions"), 405, code="method_not_allowed")


def test_health_and_not_ready_without_engine(open_app):
    assert _request(open_app, "GET", "/health").json() == {"status": "ok"}
    resp = _request(open_app, "GET", "/ready")
    assert resp.status_code == 503 and resp.json()["status"] == "not_ready"
    metrics = _request(open_app, "GET", "/metrics")
    assert metrics.status_code == 200 and "python_info" in metrics.text


# ---------------------------------------------------------------------------------------------------- auth
def test_no_keys_configured_is_open(open_app):
    # no 401: the request reaches validation
    assert_error(_request(open_app, "POST", "/v1/completions", json={}), 400)
    assert _request(open_app, "GET", "/admin/capture").status_code == 200


def test_api_key_required_and_checked():
    app = _app(api_keys=[KEY], admin_key=ADMIN)
    assert_error(_request(app, "POST", "/v1/completions", json={}), 401, code="missing_api_key")
    err = assert_error(_request(app, "POST", "/v1/completions", json={}, headers={"Authorization": "Bearer nope"}),
                       401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert_error(_request(app, "POST", "/v1/completions", json={}, headers={"Authorization": f"Basic {KEY}"}), 401)
    # auth is checked before the body is parsed
    assert_error(_request(app, "POST", "/v1/completions", content=b"{bad"), 401)
    # the right key gets through to validation
    assert_error(_request(app, "POST", "/v1/completions", json={}, headers={"Authorization": f"Bearer {KEY}"}), 400)
    # the admin key is not an API key
    assert_error(_request(app, "POST", "/v1/completions", json={}, headers={"Authorization": f"Bearer {ADMIN}"}),
                 401)
    # health/ready/metrics are open
    assert _request(app, "GET", "/health").status_code == 200


def test_admin_key_on_admin_routes_only():
    app = _app(api_keys=[KEY], admin_key=ADMIN)
    assert_error(_request(app, "GET", "/admin/capture"), 401)
    assert_error(_request(app, "GET", "/admin/capture", headers={"Authorization": f"Bearer {KEY}"}), 401,
                 code="invalid_api_key")
    resp = _request(app, "GET", "/admin/capture", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200 and resp.json() == {"enabled": True, "sample_rate": 1.0}


def test_admin_disabled_when_api_keys_but_no_admin_key():
    app = _app(api_keys=[KEY])
    assert_error(_request(app, "GET", "/admin/capture", headers={"Authorization": f"Bearer {KEY}"}), 403,
                 code="admin_disabled")


# ---------------------------------------------------------------------------------------------------- admission
def test_admission_queue_bounds_and_429():
    async def go():
        adm = Admission(max_running=2, max_queued=1)
        a, b = await adm.acquire(), await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        assert adm.running == 2 and adm.queued == 1
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert info.value.status == 429 and int(info.value.headers["Retry-After"]) >= 1
        a.release()
        c = await asyncio.wait_for(waiter, 1)
        assert adm.running == 2 and adm.queued == 0
        # a queued request whose client leaves frees its place
        gone = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert adm.queued == 0
        b.release()
        c.release()
        c.release()  # idempotent
        assert adm.running == 0
        assert adm.rejected == 1

    asyncio.run(go())


def test_admission_handoff_to_cancelled_waiter_is_not_lost():
    async def go():
        adm = Admission(max_running=1, max_queued=2)
        a = await adm.acquire()
        w1 = asyncio.ensure_future(adm.acquire())
        w2 = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        a.release()  # hands the slot to w1...
        w1.cancel()  # ...which is cancelled before it runs: the slot must go on to w2
        s2 = await asyncio.wait_for(w2, 1)
        assert adm.running == 1
        s2.release()
        assert adm.running == 0

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------- announcements
def test_announcement_parsing():
    ann = Announcement.parse('{"version": "v3", "path": "/d/v3", "sha256": "ab"}')
    assert (ann.version, ann.path, ann.sha256) == ("v3", "/d/v3", "ab")
    for bad in ("nope", "[]", '{"path": "/x"}', '{"version": "v"}', '{"version": "v", "path": "/x", "sha256": 1}'):
        with pytest.raises(ValueError):
            Announcement.parse(bad)
