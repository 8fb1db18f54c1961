"""Draft version registry in Redis: the one place that says which versions exist, which serves, which served before.

Keys (prefix = RedisSettings.key_prefix):

    <prefix>:drafts:versions   hash   version -> JSON metadata {version, path, sha256, created, status, ...}
    <prefix>:drafts:current    string version currently announced (what the engines should serve)
    <prefix>:drafts:previous   string version announced before it (the default rollback target)
    <prefix>:drafts:history    list   JSON {version, at, reason}, newest first (capped)
    <prefix>:drafts:latest     string the last announcement JSON (the gateway's subscriber reads it on (re)subscribe)
    <prefix>:drafts:seq        counter for version names (v0001, v0002, ...)
    <prefix>:drafts            pub/sub channel: announcements {"version", "path", "sha256"}
    <prefix>:adaptation:paused "1" while the admin API has paused adaptation (the worker stops training)

`announce` refuses a version whose directory is incomplete or whose model.safetensors does not hash to the
registered sha256, so a partially written checkpoint can never be announced. The gateway's admin API can reuse
`DraftRegistry` (sync) or `AsyncDraftRegistry.resolve` (its VersionRegistry protocol) for promote/rollback.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import redis

WEIGHTS_FILE = "model.safetensors"
HISTORY_LEN = 200


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def keys(prefix: str) -> dict[str, str]:
    return {
        "versions": f"{prefix}:drafts:versions",
        "current": f"{prefix}:drafts:current",
        "previous": f"{prefix}:drafts:previous",
        "history": f"{prefix}:drafts:history",
        "latest": f"{prefix}:drafts:latest",
        "seq": f"{prefix}:drafts:seq",
        "channel": f"{prefix}:drafts",
        "paused": f"{prefix}:adaptation:paused",
    }


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
        self.k = keys(key_prefix)
        self.public_url = public_url.rstrip("/") if public_url else None

    @property
    def channel(self) -> str:
        return self.k["channel"]

    # -- versions ---------------------------------------------------------------------------------------------
    def next_version(self) -> str:
        return f"v{int(self.client.incr(self.k['seq'])):04d}"

    def register(self, version: str, path: str | Path, sha256: str, metadata: dict | None = None) -> dict:
        meta = {"version": version, "path": str(path), "sha256": sha256, "created": time.time(),
                "status": "registered", **(metadata or {})}
        if self.public_url:
            meta["url"] = f"{self.public_url}/drafts/{version}"
        self.client.hset(self.k["versions"], version, json.dumps(meta))
        return meta

    def get(self, version: str) -> dict | None:
        raw = self.client.hget(self.k["versions"], version)
        return json.loads(raw) if raw else None

    def versions(self) -> dict[str, dict]:
        return {_s(v): json.loads(m) for v, m in self.client.hgetall(self.k["versions"]).items()}

    def update(self, version: str, **fields) -> None:
        meta = self.get(version)
        if meta is not None:
            meta.update(fields)
            self.client.hset(self.k["versions"], version, json.dumps(meta))

    def current(self) -> str | None:
        return _s(self.client.get(self.k["current"]))

    def previous(self) -> str | None:
        return _s(self.client.get(self.k["previous"]))

    def history(self, n: int = 50) -> list[dict]:
        return [json.loads(x) for x in self.client.lrange(self.k["history"], 0, n - 1)]

    def resolve(self, version: str) -> tuple[str, str] | None:
        meta = self.get(version)
        return (meta["path"], meta["sha256"]) if meta else None

    # -- announcing -------------------------------------------------------------------------------------------
    def verify(self, meta: dict) -> None:
        """Refuse a directory that is not a complete, published checkpoint with the registered hash."""
        path = Path(meta["path"])
        weights = path / WEIGHTS_FILE
        if path.name.startswith(".") or ".tmp" in path.name:
            raise AnnounceError(f"{path} is a temporary directory")
        if not (path / "config.json").is_file() or not weights.is_file():
            raise AnnounceError(f"{path} is not a complete checkpoint (config.json / {WEIGHTS_FILE} missing)")
        actual = sha256_file(weights)
        if actual != meta["sha256"]:
            raise AnnounceError(f"{weights} hashes to {actual[:12]}, registered {meta['sha256'][:12]}")

    def announce(self, version: str, reason: str = "publish", verify: bool = True) -> dict:
        """Make `version` current (the old current becomes previous) and publish the announcement.
        Returns the announcement dict. Raises AnnounceError for an unknown or incomplete version."""
        meta = self.get(version)
        if meta is None:
            raise AnnounceError(f"unknown draft version {version!r}")
        if verify:
            self.verify(meta)
        ann = {"version": version, "path": meta["path"], "sha256": meta["sha256"]}
        if meta.get("url"):
            ann["url"] = meta["url"]
        payload = json.dumps(ann)
        old = self.current()
        pipe = self.client.pipeline(transaction=True)
        if old is not None and old != version:
            pipe.set(self.k["previous"], old)
        pipe.set(self.k["current"], version)
        pipe.set(self.k["latest"], payload)
        pipe.lpush(self.k["history"], json.dumps({"version": version, "from": old, "at": time.time(),
                                                  "reason": reason}))
        pipe.ltrim(self.k["history"], 0, HISTORY_LEN - 1)
        pipe.execute()
        self.update(version, status="current", announced=time.time())
        self.client.publish(self.k["channel"], payload)
        return ann

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
                self.client.delete(self.k["previous"])
            else:
                self.client.set(self.k["previous"], prev)
        return ann

    def _previous_good(self, exclude: set) -> str | None:
        for h in self.history(HISTORY_LEN):
            v = h.get("version")
            if v not in exclude and (self.get(v) or {}).get("status") != "rolled_back":
                return v
        return None

    # -- adaptation pause -------------------------------------------------------------------------------------
    def is_paused(self) -> bool:
        return _s(self.client.get(self.k["paused"])) == "1"

    def set_paused(self, paused: bool) -> None:
        self.client.set(self.k["paused"], "1" if paused else "0")


class AsyncDraftRegistry:
    """The gateway's VersionRegistry protocol (async resolve) over the same keys."""

    def __init__(self, async_client, key_prefix: str = "lkserve"):
        self.client, self.k = async_client, keys(key_prefix)

    async def resolve(self, version: str) -> tuple[str, str | None] | None:
        raw = await self.client.hget(self.k["versions"], version)
        if not raw:
            return None
        meta = json.loads(raw)
        return meta["path"], meta.get("sha256")
