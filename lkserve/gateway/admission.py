"""Bounded admission: at most `max_running` generation requests in the engine, at most `max_queued` waiting for a
slot; the next one is answered 429 with `Retry-After` at once instead of piling up.

A request holds its slot until its last byte is sent (streaming) or its response is built; a client that goes
away while queued leaves the queue (its waiting task is cancelled).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from lkserve.gateway.errors import RATE_LIMIT, APIError


class Admission:
    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.max_running = max_running
        self.max_queued = max(0, max_queued)
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected = 0
        self._mean_seconds = 1.0  # EWMA of how long a slot is held, for Retry-After

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead of us drained at the observed rate."""
        waves = (self.queued + 1) / self.max_running
        return int(min(60, max(1, math.ceil(waves * self._mean_seconds))))

    async def acquire(self) -> Slot:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return Slot(self)
        if self.queued >= self.max_queued:
            self.rejected += 1
            retry = self.retry_after()
            raise APIError(
                429,
                f"The server is overloaded ({self.running} requests running, {self.queued} queued); "
                f"retry in {retry} s.",
                type=RATE_LIMIT,
                code="server_overloaded",
                headers={"Retry-After": str(retry)},
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _release hands its slot over: running is not decremented in between
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self._release(None)  # the slot was handed to us as we were cancelled: pass it on
            raise
        return Slot(self)

    def _release(self, held_seconds: float | None) -> None:
        if held_seconds is not None:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * max(0.05, held_seconds)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


class Slot:
    """One admitted request. `release()` is idempotent: call it in a finally (or when the stream closes)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._t0 = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(time.monotonic() - self._t0)
