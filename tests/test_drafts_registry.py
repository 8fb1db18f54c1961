"""lkserve.drafts against a real redis-server: the writer's announcement is what the reader parses, promotes of
unknown versions register them, and the async registry is the sync one."""

from __future__ import annotations

import asyncio
import json

import pytest

from lkserve.checkpoint import checkpoint_sha256
from lkserve.drafts import AnnounceError, Announcement, AsyncDraftRegistry, DraftKeys, DraftRegistry


def test_keys_are_the_documented_names():
    k = DraftKeys("p")
    assert (k.versions, k.current, k.previous, k.history, k.latest, k.seq, k.channel, k.paused) == (
        "p:drafts:versions", "p:drafts:current", "p:drafts:previous", "p:drafts:history", "p:drafts:latest",
        "p:drafts:seq", "p:drafts", "p:adaptation:paused")


def test_the_writers_announcement_is_what_readers_parse(tiny, redis_url):
    reg = DraftRegistry(redis_url, "dk1", public_url="http://worker:9100/")
    sha = checkpoint_sha256(tiny.random_draft)
    reg.register("v1", tiny.random_draft, sha)
    ann = reg.announce("v1")
    parsed = Announcement.parse(reg.client.get(reg.keys.latest))
    assert parsed == Announcement("v1", str(tiny.random_draft), sha, "http://worker:9100/drafts/v1")
    assert ann == parsed.as_dict()
    assert Announcement("v2", "/d").to_json() == '{"version": "v2", "path": "/d", "sha256": null}'


def test_ensure_registered(tiny, redis_url):
    reg = DraftRegistry(redis_url, "dk2")
    sha = checkpoint_sha256(tiny.copy_draft)
    assert reg.ensure_registered("op", tiny.copy_draft, sha)["sha256"] == sha
    reg.client.hset(reg.keys.versions, "nosha", json.dumps({"version": "nosha", "path": str(tiny.copy_draft)}))
    reg.ensure_registered("nosha", tiny.copy_draft, sha)
    assert reg.get("nosha")["sha256"] == sha
    with pytest.raises(AnnounceError, match="registered at"):
        reg.ensure_registered("op", tiny.random_draft, sha)


def test_async_registry_announces_rolls_back_and_pauses(tiny, redis_url):
    reg = DraftRegistry(redis_url, "dk3")
    reg.register("a", tiny.random_draft, checkpoint_sha256(tiny.random_draft))
    reg.register("b", tiny.copy_draft, checkpoint_sha256(tiny.copy_draft))
    areg = AsyncDraftRegistry(reg)

    async def run():
        await areg.announce("a", "test")
        await areg.announce("b", "test")
        assert (await areg.current(), await areg.previous()) == ("b", "a")
        await areg.rollback(await areg.previous(), "test rollback")
        await areg.set_paused(True)
        return await areg.resolve("b"), await areg.is_paused()

    resolved, paused = asyncio.run(run())
    assert resolved == (str(tiny.copy_draft), checkpoint_sha256(tiny.copy_draft)) and paused
    assert reg.current() == "a" and reg.get("b")["status"] == "rolled_back" and reg.is_paused()
