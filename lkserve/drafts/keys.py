"""The Redis names of the draft registry, and the one announcement type its writer and its readers share.

Keys (prefix = RedisSettings.key_prefix):

    <prefix>:drafts:versions   hash   version -> JSON metadata {version, path, sha256, created, status, ...}
    <prefix>:drafts:current    string version currently announced (what every engine should serve)
    <prefix>:drafts:previous   string version announced before it (the default rollback target)
    <prefix>:drafts:history    list   JSON {version, from, at, reason}, newest first (capped)
    <prefix>:drafts:latest     string the last announcement JSON (a subscriber reads it on every (re)subscribe)
    <prefix>:drafts:seq        counter for version names (v0001, v0002, ...)
    <prefix>:drafts            pub/sub channel: announcements
    <prefix>:adaptation:paused "1" while adaptation is paused (the worker stops training)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DraftKeys:
    prefix: str = "lkserve"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:drafts:versions"

    @property
    def current(self) -> str:
        return f"{self.prefix}:drafts:current"

    @property
    def previous(self) -> str:
        return f"{self.prefix}:drafts:previous"

    @property
    def history(self) -> str:
        return f"{self.prefix}:drafts:history"

    @property
    def latest(self) -> str:
        return f"{self.prefix}:drafts:latest"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:drafts:seq"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:drafts"

    @property
    def paused(self) -> str:
        return f"{self.prefix}:adaptation:paused"


@dataclass(frozen=True)
class Announcement:
    """What `<prefix>:drafts` carries and `<prefix>:drafts:latest` holds: serve `version` from `path` (or, when
    `path` is not on this machine, fetch it from `url`); `sha256` is the checkpoint's digest."""

    version: str
    path: str
    sha256: str | None = None
    url: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k in ("version", "path", "sha256") or v})

    def as_dict(self) -> dict:
        return json.loads(self.to_json())

    @classmethod
    def parse(cls, raw: bytes | str) -> Announcement:
        """Raises ValueError for anything that is not a well-formed announcement."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"announcement is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("announcement is not a JSON object")  # noqa: TRY004 - bad input, not a bad call
        version, path, sha = data.get("version"), data.get("path"), data.get("sha256")
        if not isinstance(version, str) or not version:
            raise ValueError("announcement has no 'version' string")
        if not isinstance(path, str) or not path:
            raise ValueError("announcement has no 'path' string")
        if sha is not None and not isinstance(sha, str):
            raise ValueError("announcement 'sha256' is not a string")
        url = data.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ValueError("announcement 'url' is not an http(s) URL")
        return cls(version, path, sha or None, url or None)
