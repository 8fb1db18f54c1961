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
