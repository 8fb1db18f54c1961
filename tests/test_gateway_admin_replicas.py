"""Two gateway replicas (two apps, each with its own real engine) on one real Redis: the admin API's promote,
rollback and pause go through the draft registry, so both replicas and the worker's gate follow, and a
subscriber reconnect (which re-reads `<prefix>:drafts:latest`) does not undo an operator's promote."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from lkserve.checkpoint import checkpoint_sha256
from lkserve.config import GatewaySettings, RedisSettings, Settings
from lkserve.drafts import DraftRegistry
from lkserve.gateway import create_app
from tests.conftest import EngineHandle, _capture, _settings, _start, _stop
from tests.test_gateway_api import LiveServer

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-replicas-0123456789"
PREFIX = "lkreplicas"


@pytest.fixture(scope="module")
def second_engine(tiny, engine_loop):
    engine = _start(engine_loop, _settings(tiny), _capture(enabled=False), draft_version="random")
    yield EngineHandle(engine, engine_loop, {"random": tiny.random_draft, "target": tiny.copy_draft})
    _stop(engine_loop, engine)


@pytest.fixture(scope="module")
def gateways(spec_engine, second_engine, redis_server):
    spec_engine.use_draft("random")
    r = redis.Redis.from_url(redis_server.url)
    for key in r.scan_iter(f"{PREFIX}:*"):
        r.delete(key)
    r.close()
    settings = Settings(gateway=GatewaySettings(admin_key=ADMIN_KEY),
                        redis=RedisSettings(url=redis_server.url, key_prefix=PREFIX))
    servers = [LiveServer(create_app(h.engine, settings), h.loop) for h in (spec_engine, second_engine)]
    for s, h in zip(servers, (spec_engine, second_engine)):
        wait_until(lambda s=s: s.state.drafts._subscribed.is_set(), 10, "the draft subscriber")
        s.handle = h
    yield servers
    for s in servers:
        s.stop()
    spec_engine.use_draft("random")


def admin(gw, method, path, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=60, **kw)


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def serving(gw) -> tuple[str, str]:
    """(what /admin/draft says, what the engine's own draft info says)."""
    return admin(gw, "GET", "/draft").json()["version"], gw.handle.run(gw.handle.engine.draft_info())["version"]


def test_promote_and_rollback_reach_every_replica_and_the_registry(gateways, tiny, redis_server):
    gw1, gw2 = gateways
    reg = DraftRegistry(redis_server.url, PREFIX)
    # what a worker leaves behind: "random" announced, so drafts:latest names it
    reg.register("random", tiny.random_draft, checkpoint_sha256(tiny.random_draft))
    reg.announce("random")
    assert serving(gw1) == serving(gw2) == ("random", "random")

    # promote a path the registry does not know, through replica 1
    resp = admin(gw1, "POST", "/draft/promote", json={"version": "promoted", "path": str(tiny.copy_draft)})
    assert resp.status_code == 200, resp.text
    meta = reg.get("promoted")
    assert meta["path"] == str(tiny.copy_draft) and meta["sha256"] == checkpoint_sha256(tiny.copy_draft)
    wait_until(lambda: gw2.handle.engine.draft_version == "promoted", 30, "replica 2 to follow the promote")
    assert serving(gw1) == serving(gw2) == ("promoted", "promoted")
    assert gw2.state.drafts.history[-1].source == "announcement"
    # the worker's gate compares against registry.current() (Worker._load_serving loads its path)
    assert reg.current() == "promoted" and reg.previous() == "random"
    assert reg.get(reg.current())["path"] == str(tiny.copy_draft)

    # a subscriber reconnect re-reads drafts:latest: it names the promoted version, nothing is undone
    seen = [gw.state.drafts.announcements_received for gw in gateways]
    r = redis.Redis.from_url(redis_server.url)
    assert r.client_kill_filter(_type="pubsub") >= 2
    for gw, n in zip(gateways, seen):
        wait_until(lambda gw=gw, n=n: gw.state.drafts.announcements_received > n and gw.state.drafts.running,
                   30, "the subscriber to resubscribe and re-read drafts:latest")
    wait_until(lambda: r.pubsub_numsub(f"{PREFIX}:drafts")[0][1] == 2, 10, "both subscribers back")
    assert serving(gw1) == serving(gw2) == ("promoted", "promoted")

    # rollback through replica 2: replica 1 follows, the registry says so
    resp = admin(gw2, "POST", "/draft/rollback", json={})
    assert resp.status_code == 200 and resp.json()["version"] == "random", resp.text
    wait_until(lambda: gw1.handle.engine.draft_version == "random", 30, "replica 1 to follow the rollback")
    assert serving(gw1) == serving(gw2) == ("random", "random")
    assert reg.current() == "random" and reg.get("promoted")["status"] == "rolled_back"
    assert r.get(f"{PREFIX}:drafts:latest") and reg.history(1)[0]["reason"] == "admin_rollback"

    # a refused checkpoint is neither loaded nor announced
    bad = admin(gw1, "POST", "/draft/promote", json={"version": "nope", "path": "/nonexistent"})
    assert bad.status_code == 422 and reg.current() == "random" and reg.get("nope") is None
    r.close()
    reg.client.close()


def test_pause_reaches_the_worker_flag(gateways, redis_server):
    gw1, gw2 = gateways
    reg = DraftRegistry(redis_server.url, PREFIX)
    assert admin(gw1, "POST", "/adaptation/pause").json() == {"paused": True, "key": f"{PREFIX}:adaptation:paused"}
    assert reg.is_paused()  # what the worker reads before each read/train step
    assert admin(gw2, "GET", "/adaptation").json()["paused"] is True
    assert admin(gw2, "POST", "/adaptation/resume").json()["paused"] is False
    assert not reg.is_paused()
    reg.client.close()
