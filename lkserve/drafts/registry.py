"""The draft version registry in Redis (key names in lkserve.drafts.keys): the one source of truth for which
version serves. The worker announces what it publishes; the gateway's admin API announces what an operator
promotes or rolls back to; every gateway's subscriber and the worker's gate follow `current`.

`announce` refuses a version whose directory is incomplete or whose model.safetensors does not hash to the
registered sha256, so a partially written checkpoint can never be announced.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis

from lkserve.checkpoint import WEIGHTS_FILE, sha256_file
from lkserve.drafts.keys import Announcement, DraftKeys

HISTORY_LEN = 200


class AnnounceError(RuntimeError):
    pass


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


class DraftRegistry:
    def __init__(self, client_or_url, key_prefix: str = "lkserve", public_url: str | None = None):
        """public_url: where this worker's HTTP port is reachable (e.g. http://worker:9100); versions registered
        through it carry `url` = <public_url>/drafts/<version>, so gateways without the worker's disk can fetch."""
        self.client = redis.Redis.from_url(client_or_url) if isinstance(client_or_url, str) else client_or_url
        self.prefix = key_prefix
        self.keys = DraftKeys(key_prefix)
        self.public_url = public_url.rstrip("/") if public_url else None

    @property
    def channel(self) -> str:
        return self.keys.channel

    # -- versions ---------------------------------------------------------------------------------------------
    def next_version(self) -> str:
        return f"v{int(self.client.incr(self.keys.seq)):04d}"

    def register(self, version: str, path: str | Path, sha256: str, metadata: dict | None = None) -> dict:
        meta = {"version": version, "path": str(path), "sha256": sha256, "created": time.time(),
                "status": "registered", **(metadata or {})}
        if self.public_url:
            meta["url"] = f"{self.public_url}/drafts/{version}"
        self.client.hset(self.keys.versions, version, json.dumps(meta))
        return meta

    def get(self, version: str) -> dict | None:
        raw = self.client.hget(self.keys.versions, version)
        return json.loads(raw) if raw else None

    def versions(self) -> dict[str, dict]:
        return {_s(v): json.loads(m) for v, m in self.client.hgetall(self.keys.versions).items()}

    def update(self, version: str, **fields) -> None:
        meta = self.get(version)
        if meta is not None:
            meta.update(fields)
            self.client.hset(self.keys.versions, version, json.dumps(meta))

    def current(self) -> str | None:
        return _s(self.client.get(self.keys.current))

    def previous(self) -> str | None:
        return _s(self.client.get(self.keys.previous))

    def history(self, n: int = 50) -> list[dict]:
        return [json.loads(x) for x in self.client.lrange(self.keys.history, 0, n - 1)]

    def resolve(self, version: str) -> tuple[str, str | None] | None:
        meta = self.get(version)
        return (meta["path"], meta.get("sha256")) if meta else None

    def ensure_registered(self, version: str, path: str | Path, sha256: str, metadata: dict | None = None) -> dict:
        """Register a version the registry does not know yet (one an operator promotes by path); fill in the
        sha256 of one registered without it. Refuses to re-point a known version at another directory."""
        meta = self.get(version)
        if meta is None:
            return self.register(version, path, sha256, metadata)
        if Path(meta["path"]) != Path(path):
            raise AnnounceError(f"version {version!r} is registered at {meta['path']}, not {path}")
        if not meta.get("sha256"):
            self.update(version, sha256=sha256)
            meta["sha256"] = sha256
        return meta

    # -- announcing -------------------------------------------------------------------------------------------
    def verify(self, meta: dict) -> None:
        """Refuse a directory that is not a complete, published checkpoint with the registered hash."""
        path = Path(meta["path"])
        weights = path / WEIGHTS_FILE
        if path.name.startswith(".") or ".tmp" in path.name:
            raise AnnounceError(f"{path} is a temporary directory")
        if not (path / "config.json").is_file() or not weights.is_file():
            raise AnnounceError(f"{path} is not a complete checkpoint (config.json / {WEIGHTS_FILE} missing)")
        if not meta.get("sha256"):
            raise AnnounceError(f"version {meta['version']!r} has no registered sha256")
        actual = sha256_file(weights)
        if actual != meta["sha256"]:
            raise AnnounceError(f"{weights} hashes to {actual[:12]}, registered {meta['sha256'][:12]}")

    def announce(self, version: str, reason: str = "publish", verify: bool = True) -> dict:
        """Make `version` current (the old current becomes previous) and publish the announcement.
        Returns the announcement as a dict. Raises AnnounceError for an unknown or incomplete version."""
        meta = self.get(version)
        if meta is None:
            raise AnnounceError(f"unknown draft version {version!r}")
        if verify:
            self.verify(meta)
        payload = Announcement(version, meta["path"], meta.get("sha256"), meta.get("url")).to_json()
        old = self.current()
        pipe = self.client.pipeline(transaction=True)
        if old is not None and old != version:
            pipe.set(self.keys.previous, old)
        pipe.set(self.keys.current, version)
        pipe.set(self.keys.latest, payload)
        pipe.lpush(self.keys.history, json.dumps({"version": version, "from": old, "at": time.time(),
                                                  "reason": reason}))
        pipe.ltrim(self.keys.history, 0, HISTORY_LEN - 1)
        pipe.execute()
        self.update(version, status="current", announced=time.time())
        self.client.publish(self.keys.channel, payload)
        return json.loads(payload)

    def rollback(self, to: str | None = None, reason: str = "manual rollback") -> dict:
        """Announce `to` (default: the previous version). The rolled-back version is marked `rolled_back`."""
        bad = self.current()
        target = to or self.previous()
        if target is None:
            raise AnnounceError("no previous draft version to roll back to")
        ann = self.announce(target, reason=reason)
        if bad is not None and bad != target:
            self.update(bad, status="rolled_back", rolled_back_at=time.time(), rollback_reason=reason)
            # the previous pointer must not bounce back to the bad version
            prev = self._previous_good(exclude={target, bad})
            if prev is None:
                self.client.delete(self.keys.previous)
            else:
                self.client.set(self.keys.previous, prev)
        return ann

    def _previous_good(self, exclude: set) -> str | None:
        for h in self.history(HISTORY_LEN):
            v = h.get("version")
            if v not in exclude and (self.get(v) or {}).get("status") != "rolled_back":
                return v
        return None

    # -- adaptation pause -------------------------------------------------------------------------------------
    def is_paused(self) -> bool:
        return _s(self.client.get(self.keys.paused)) == "1"

    def set_paused(self, paused: bool) -> None:
        self.client.set(self.keys.paused, "1" if paused else "0")


class AsyncDraftRegistry:
    """The same registry for an event loop (the gateway): each call runs the sync one in a thread, so there is
    one implementation of announce / rollback / pause. Also the gateway's VersionRegistry (async resolve)."""

    def __init__(self, registry: DraftRegistry):
        self.sync = registry
        self.keys = registry.keys

    async def resolve(self, version: str) -> tuple[str, str | None] | None:
        return await asyncio.to_thread(self.sync.resolve, version)

    async def current(self) -> str | None:
        return await asyncio.to_thread(self.sync.current)

    async def previous(self) -> str | None:
        return await asyncio.to_thread(self.sync.previous)

    async def ensure_registered(self, version: str, path: str, sha256: str, metadata: dict | None = None) -> dict:
        return await asyncio.to_thread(self.sync.ensure_registered, version, path, sha256, metadata)

    async def announce(self, version: str, reason: str) -> dict:
        return await asyncio.to_thread(self.sync.announce, version, reason)

    async def rollback(self, to: str, reason: str) -> dict:
        return await asyncio.to_thread(self.sync.rollback, to, reason)

    async def is_paused(self) -> bool:
        return await asyncio.to_thread(self.sync.is_paused)

    async def set_paused(self, paused: bool) -> None:
        await asyncio.to_thread(self.sync.set_paused, paused)

    def close(self) -> None:
        self.sync.client.close()
