"""The Redis sink: verification records into a Redis Stream, off the serving hot path.

`put` encodes the record (a snapshot: the engine may reuse its buffers right after) and hands the bytes to a bounded
queue without waiting; a daemon thread drains the queue in pipelined batches of XADD. Capture is best effort by
design: when the queue is full or Redis is slow or down, records are dropped and counted, never waited for, and the
thread reconnects with exponential backoff. Every XADD trims the stream to ~`maxlen` entries (MAXLEN ~, whole
radix-tree nodes at a time, so it is cheap and the length overshoots by at most one node, 100 entries), which bounds
Redis memory to about maxlen x record size; `retention_seconds` also drops entries older than that (XTRIM MINID).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lkserve.capture import metrics
from lkserve.capture.codec import encode
from lkserve.capture.record import VerificationRecord

log = logging.getLogger(__name__)

FIELD = b"r"  # the one field of a stream entry: the encoded record


class RedisStreamWriter:
    """A `CaptureSink` that writes to a Redis Stream. Counters: `written`, `dropped` (+ `dropped_by_reason`), `errors`."""

    def __init__(
        self,
        url: str,
        stream: str = "lkserve:capture",
        maxlen: int = 100_000,
        queue_size: int = 4096,
        retention_seconds: float | None = None,
        max_queue_bytes: int = 64 << 20,
        batch_size: int = 128,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        socket_timeout: float = 2.0,
    ):
        self.url, self.stream, self.maxlen = url, stream, maxlen
        self.retention_seconds = retention_seconds
        self.written = 0
        self.errors = 0  # failed Redis round trips and unencodable records (incidents, not records)
        self.dropped_by_reason: dict[str, int] = {}
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._batch_size = batch_size
        self._backoff = (backoff_initial, backoff_max)
        self._socket_timeout = socket_timeout
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # counters and queued bytes: put may be called from several threads
        self._closed = threading.Event()
        self._last_trim = 0.0
        self._last_warning = -float("inf")  # warnings are rate-limited: an outage must not flood the logs
        self._thread = threading.Thread(target=self._run, name="lkserve-capture-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        with self._lock:
            return sum(self.dropped_by_reason.values())

    def put(self, record: VerificationRecord) -> bool:
        """Never blocks on Redis: encode, enqueue, or drop and count. The caller may reuse the record afterwards."""
        if self._closed.is_set():
            return self._drop("closed")
        if self._queue.full():  # do not spend an encode on a record that cannot be queued
            return self._drop("queue_full")
        try:
            data = encode(record)
        except Exception:
            log.exception("capture: record %s cannot be encoded, dropped", getattr(record, "request_id", "?"))
            with self._lock:
                self.errors += 1
            return self._drop("invalid")
        with self._lock:
            fits = self._queued_bytes + len(data) <= self._max_queue_bytes
            if fits:
                try:
                    self._queue.put_nowait(data)
                    self._queued_bytes += len(data)
                except queue.Full:
                    fits = False
        return True if fits else self._drop("queue_full")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was written or dropped (tests, benchmarks, shutdown)."""
        with self._queue.all_tasks_done:
            return self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting records, write what is queued (for up to `timeout` s), stop the thread."""
        self._closed.set()
        self._thread.join(timeout)

    # --- the flusher thread ---

    def _run(self) -> None:
        client, backoff, failing = None, self._backoff[0], False
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if not batch:  # idle: still enforce the retention while connected
                if client is not None:
                    self._maybe_trim_by_age(client)
                continue
            try:
                if client is None:
                    client = self._connect()
                self._write(client, batch)
                self._maybe_trim_by_age(client)
                if failing:
                    log.info("capture: Redis at %s is back, writing resumed", self.url)
                backoff, failing = self._backoff[0], False
            except Exception as exc:  # noqa: BLE001 - Redis errors and anything else: the flusher must not die
                if not failing:
                    self._warn(
                        "capture: Redis write failed (%s); dropping records, reconnecting with backoff", exc
                    )
                failing = True
                with self._lock:
                    self.errors += 1
                self._drop("redis_error", len(batch))
                _close_quietly(client)
                client = None
                # While closing, give up waiting: close() bounds how long we keep trying.
                self._closed.wait(backoff)
                backoff = min(2 * backoff, self._backoff[1])
            finally:
                with self._lock:
                    self._queued_bytes -= sum(len(data) for data in batch)
                for _ in batch:
                    self._queue.task_done()
        _close_quietly(client)

    def _next_batch(self) -> list[bytes] | None:
        """Up to batch_size queued records; [] when idle; None once closed and drained."""
        try:
            batch = [self._queue.get(timeout=0.05)]
        except queue.Empty:
            return None if self._closed.is_set() else []
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _connect(self) -> redis.Redis:
        # No client-side retries: the backoff above is the retry policy, and the thread must not stall in one.
        client = redis.Redis.from_url(
            self.url,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        client.ping()
        return client

    def _write(self, client: redis.Redis, batch: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for data in batch:
            pipe.xadd(self.stream, {FIELD: data}, maxlen=self.maxlen, approximate=True)
        results = pipe.execute(raise_on_error=False)  # connection errors still raise
        failed = [r for r in results if isinstance(r, Exception)]
        ok = len(results) - len(failed)
        with self._lock:
            self.written += ok
        metrics.count_written(ok)
        if failed:
            with self._lock:
                self.errors += 1
            self._drop("redis_error", len(failed))
            self._warn("capture: Redis rejects XADD (%s); dropping those records", failed[0])
            if any(isinstance(r, redis.exceptions.OutOfMemoryError) for r in failed):
                self._make_room(client)

    def _make_room(self, client: redis.Redis) -> None:
        """Redis hit maxmemory before the stream hit maxlen: drop the oldest tenth so new records fit again."""
        try:
            client.xtrim(self.stream, maxlen=int(client.xlen(self.stream) * 0.9), approximate=True)
        except redis.RedisError as exc:
            self._warn("capture: XTRIM to make room failed (%s)", exc)

    def _maybe_trim_by_age(self, client: redis.Redis) -> None:
        """XTRIM MINID at most once a second. Entry ids are the server's ms clock, so ask the server what time it is."""
        if self.retention_seconds is None or time.monotonic() - self._last_trim < 1:
            return
        self._last_trim = time.monotonic()
        try:
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            client.xtrim(self.stream, minid=now_ms - int(self.retention_seconds * 1000), approximate=False)
        except redis.RedisError as exc:  # the batch itself was written; a failed trim is retried next second
            with self._lock:
                self.errors += 1
            self._warn("capture: XTRIM by age failed (%s)", exc)

    def _warn(self, msg: str, *args) -> None:
        if time.monotonic() - self._last_warning > 30:
            self._last_warning = time.monotonic()
            log.warning(msg, *args)

    def _drop(self, reason: str, n: int = 1) -> bool:
        with self._lock:
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
        metrics.count_dropped(reason, n)
        return False


def _close_quietly(client: redis.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(redis.RedisError, OSError):
            client.close()
