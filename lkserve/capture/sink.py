"""Where the engine puts verification records. `put` never blocks: serving must not wait on capture."""

from __future__ import annotations

import collections
import threading
from typing import Protocol

from lkserve.capture.record import VerificationRecord


class CaptureSink(Protocol):
    def put(self, record: VerificationRecord) -> bool:
        """Hand a record over without blocking; False if it was dropped (and counted)."""

    def close(self) -> None: ...


class MemorySink:
    """A bounded in-process buffer: tests and `drain` over RPC read from it. Drops the newest when full."""

    def __init__(self, maxlen: int = 4096):
        self._records: collections.deque[VerificationRecord] = collections.deque()
        self._maxlen = maxlen
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, record: VerificationRecord) -> bool:
        with self._lock:
            if len(self._records) >= self._maxlen:
                self.dropped += 1
                return False
            self._records.append(record)
            return True

    def drain(self) -> list[VerificationRecord]:
        with self._lock:
            out = list(self._records)
            self._records.clear()
            return out

    def close(self) -> None:
        pass


def make_sink(spec: dict) -> CaptureSink:
    """Build a sink from a plain dict: the spec crosses into vLLM's engine process, a live sink cannot.

    {"kind": "memory", "maxlen": 4096}
    {"kind": "redis", "url": "redis://127.0.0.1:6379/0", "stream": "lkserve:capture", "maxlen": 100000,
     "queue_size": 4096, "retention_seconds": None}
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "memory":
        return MemorySink(**spec)
    if kind == "redis":
        from lkserve.capture.writer import RedisStreamWriter  # keeps redis out of processes that never write

        return RedisStreamWriter(**spec)
    raise ValueError(f"unknown capture sink kind {kind!r}; expected 'memory' or 'redis'")


def make_capture_sink(spec: dict | None, queue_size: int) -> CaptureSink:
    """The engine's sink: `spec`, or by default a memory sink of `queue_size` records (drained over RPC)."""
    return make_sink(spec or {"kind": "memory", "maxlen": queue_size})


def redis_sink_spec(url: str, redis_settings, capture_settings) -> dict:
    """The spec of the Redis sink from `RedisSettings` + `CaptureSettings` and a resolved URL."""
    return {
        "kind": "redis",
        "url": url,
        "stream": redis_settings.stream,
        "maxlen": redis_settings.stream_maxlen,
        "queue_size": capture_settings.queue_size,
        "retention_seconds": redis_settings.retention_seconds,
    }
