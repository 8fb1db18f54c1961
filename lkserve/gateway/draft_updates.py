"""Draft versions: announcements on Redis pub/sub (lkserve.drafts.Announcement) become engine hot-swaps.

Each announcement on `<prefix>:drafts` is handed to `engine.swap_draft(path, version, sha256)`. When `path` is not
a directory on this machine and the announcement has a `url`, the checkpoint is first fetched over HTTP into
`<fetch_dir>/<version>` and its sha256 checked (`draft_fetch.py`): gateways on other machines need no shared
filesystem. A refused or failed swap leaves the old version serving; the reason is kept (`last_error`, the
history, the log). Pub/sub loses messages sent while nobody listens, so on every (re)subscribe the subscriber also
reads `<prefix>:drafts:latest` and applies it if it is not the version serving.

`<prefix>:drafts:current` / `:latest` are the one record of what serves: the worker's publishes and the admin
API's promote/rollback both go through the registry (lkserve.drafts), so every replica and the worker's gate
follow, and a resubscribe re-applies what the operator chose. Which versions exist is the registry's
`<prefix>:drafts:versions`; versions it does not know are resolved from the gateway's own history
(`HistoryRegistry`). Any object with `async resolve(version) -> (path, sha256) | None` is a `VersionRegistry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from lkserve.drafts import Announcement, DraftKeys
from lkserve.gateway.protocol import DraftHistoryEntry

log = logging.getLogger("lkserve.gateway.drafts")


class VersionRegistry(Protocol):
    async def resolve(self, version: str) -> tuple[str, str | None] | None:
        """(path, sha256) of a known version, None if unknown."""


class HistoryRegistry:
    """Versions this gateway has served (loaded successfully) since it started."""

    def __init__(self, manager: DraftManager):
        self._manager = manager

    async def resolve(self, version: str) -> tuple[str, str | None] | None:
        for entry in reversed(self._manager.history):
            if entry.version == version and entry.ok and entry.path:
                return entry.path, entry.sha256
        return None


class ChainRegistry:
    """The first registry that knows the version wins (the worker's Redis registry, then our own history)."""

    def __init__(self, *registries: VersionRegistry):
        self.registries = registries

    async def resolve(self, version: str) -> tuple[str, str | None] | None:
        for registry in self.registries:
            try:
                found = await registry.resolve(version)
            except Exception as e:  # noqa: BLE001 - e.g. Redis down: try the next one
                log.warning("draft registry %s failed: %r", type(registry).__name__, e)
                continue
            if found is not None:
                return found
        return None


class DraftManager:
    def __init__(self, engine, keys: DraftKeys | None = None, history_len: int = 200,
                 registry: VersionRegistry | None = None, fetch_dir: str | Path | None = None):
        """keys: the registry's Redis names (None: no subscriber)."""
        self.engine = engine
        self.fetch_dir = Path(fetch_dir) if fetch_dir else None  # where checkpoints fetched over HTTP go
        self.channel = keys.channel if keys else None
        self.latest_key = keys.latest if keys else None
        self.history: deque[DraftHistoryEntry] = deque(maxlen=history_len)
        self.registry: VersionRegistry = registry or HistoryRegistry(self)
        self.last_error: str | None = None
        self.announcements_received = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        if engine is not None and getattr(engine, "draft_version", None) is not None:
            self.history.append(DraftHistoryEntry(
                version=str(engine.draft_version), path=getattr(engine, "draft_dir", None),
                sha256=getattr(engine, "draft_sha256", None), source="startup", ok=True, at=time.time()))

    # -- swaps -----------------------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        return getattr(self.engine, "draft_version", None)

    async def swap(self, version: str, path: str, sha256: str | None, source: str) -> DraftHistoryEntry:
        """Ask the engine to load a version; the entry says how it went. Never raises for a bad checkpoint."""
        async with self._lock:
            return await self._swap(version, path, sha256, source)

    async def _swap(self, version: str, path: str, sha256: str | None, source: str) -> DraftHistoryEntry:
        t0 = time.perf_counter()
        try:
            res = await self.engine.swap_draft(path, version, sha256=sha256)
            ok, reason, seconds = bool(res.ok), (res.reason or None), float(res.seconds)
            sha = getattr(res, "sha256", None) or sha256
            split = (f"validate {getattr(res, 'validate_seconds', 0.0):.2f}s, "
                     f"apply {getattr(res, 'apply_seconds', 0.0):.2f}s")
        except Exception as e:  # noqa: BLE001 - the old version keeps serving
            ok, reason, seconds, sha = False, f"swap raised {e!r}", time.perf_counter() - t0, sha256
            split = ""
        entry = DraftHistoryEntry(version=version, path=path, sha256=sha, source=source, ok=ok,
                                  reason=reason if not ok else (reason or None), seconds=round(seconds, 4),
                                  at=time.time())
        self.history.append(entry)
        if ok:
            log.info("draft %s now serving (%s, %.2fs: %s)", version, source, seconds, split)
        else:
            self.last_error = f"{version}: {reason}"
            log.warning("draft %s refused (%s): %s; still serving %s", version, source, reason, self.version)
        return entry

    def previous_version(self) -> str | None:
        """The version that served before the current one (for rollback without a name)."""
        current = self.version
        for entry in reversed(self.history):
            if entry.ok and entry.version != current and entry.path:
                return entry.version
        return None

    # -- announcements ---------------------------------------------------------------------------------------
    async def handle_announcement(self, raw: bytes | str, source: str = "announcement") -> DraftHistoryEntry | None:
        self.announcements_received += 1
        try:
            ann = Announcement.parse(raw)
        except ValueError as e:
            self.last_error = f"bad announcement: {e}"
            log.warning("ignoring draft announcement: %s", e)
            return None
        async with self._lock:  # compared under the lock: a swap in flight may be changing the version
            if ann.version == self.version:
                log.info("draft %s announced but already serving", ann.version)
                return None
            path = ann.path
            if ann.url and not Path(ann.path).is_dir():
                try:
                    path = str(await self._fetch(ann))
                except Exception as e:  # noqa: BLE001 - keep serving the old version, say why
                    return self._refused(ann.version, ann.path, ann.sha256, source, f"fetch failed: {e}")
            return await self._swap(ann.version, path, ann.sha256, source)

    async def _fetch(self, ann: Announcement) -> Path:
        from lkserve.gateway.draft_fetch import fetch_checkpoint

        if self.fetch_dir is None:
            raise RuntimeError("no fetch_dir configured")
        if not ann.sha256:
            raise RuntimeError("an announcement fetched over HTTP must carry its sha256")
        t0 = time.perf_counter()
        path = await fetch_checkpoint(ann.url, ann.version, ann.sha256, self.fetch_dir)
        log.info("draft %s fetched from %s in %.2fs", ann.version, ann.url, time.perf_counter() - t0)
        return path

    def _refused(self, version: str, path: str, sha256: str | None, source: str, reason: str) -> DraftHistoryEntry:
        entry = DraftHistoryEntry(version=version, path=path, sha256=sha256, source=source, ok=False, reason=reason,
                                  seconds=0.0, at=time.time())
        self.history.append(entry)
        self.last_error = f"{version}: {reason}"
        log.warning("draft %s refused (%s): %s; still serving %s", version, source, reason, self.version)
        return entry

    def start(self, redis_client) -> None:
        if self.channel is None or self._task is not None:
            return
        self._task = asyncio.ensure_future(self._run(redis_client))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Until the subscriber listens: an announcement published before that would be seen only via :latest."""
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, redis_client) -> None:
        backoff = 0.5
        while True:
            pubsub = redis_client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                backoff = 0.5
                log.info("listening for draft announcements on %s", self.channel)
                latest = await redis_client.get(self.latest_key)
                if latest is not None:
                    await self.handle_announcement(latest, source="announcement")
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        # drafts:latest, when kept, is newer than or equal to any message: a message that
                        # waited behind a swap must not bring back an older version
                        await self.handle_announcement(await redis_client.get(self.latest_key) or msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis gone: keep serving, retry
                self._subscribed.clear()
                self.last_error = f"subscriber: {e!r}"
                log.warning("draft subscriber lost Redis (%r); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": getattr(self.engine, "draft_sha256", None),
            "channel": self.channel,
            "subscriber_running": self.running,
            "announcements_received": self.announcements_received,
            "last_error": self.last_error,
            "history": list(self.history),
        }
