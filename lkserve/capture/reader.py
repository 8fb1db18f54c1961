"""The trainer's side of the capture stream: a Redis consumer group, so several training workers share one stream.

At-least-once: `read` returns (entry_id, record) pairs and nothing is acknowledged until the caller calls `ack` after
using them. Entries a crashed worker read but never acked stay pending in the group; once they have been idle for
`claim_min_idle_ms`, the next `read` of any worker takes them over (XAUTOCLAIM) before reading new ones. So pick
`claim_min_idle_ms` well above the time a worker needs between read and ack, or live workers steal each other's
records. Pending entries are still subject to the writer's MAXLEN/retention trimming: a worker down for longer than
the stream holds its records loses them (they are acked and counted in `trimmed`). An entry that does not decode must
not wedge the group: it is copied to a dead-letter stream, acked, counted in `undecodable`, and skipped.
"""

from __future__ import annotations

import logging
import os
import socket

import redis

from lkserve.capture import metrics
from lkserve.capture.codec import RecordFormatError, decode
from lkserve.capture.record import VerificationRecord
from lkserve.capture.writer import FIELD

log = logging.getLogger(__name__)


class StreamReader:
    def __init__(
        self,
        url: str,
        stream: str = "lkserve:capture",
        group: str = "lkserve-trainers",
        consumer: str | None = None,
        claim_min_idle_ms: int = 60_000,
        start_id: str = "0",
        dead_letter_stream: str | None = None,
        dead_letter_maxlen: int = 1000,
    ):
        """`start_id` only matters when the group is created: "0" = everything still in the stream, "$" = new only."""
        self.stream, self.group = stream, group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_min_idle_ms = claim_min_idle_ms
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self.dead_letter_maxlen = dead_letter_maxlen
        self.undecodable = 0  # entries set aside because they did not decode
        self.trimmed = 0  # pending entries whose data the stream dropped before anyone acked them
        self._start_id = start_id
        self._client = redis.Redis.from_url(url)
        self._ensure_group()

    def read(self, count: int = 64, block_ms: int | None = 1000) -> list[tuple[str, VerificationRecord]]:
        """Up to `count` records: first those abandoned by dead consumers, then new ones (waiting up to block_ms)."""
        entries = self._reclaim(count)
        if len(entries) < count:
            entries += self._read_new(count - len(entries), None if entries else block_ms)
        return self._decode(entries)

    def ack(self, entry_ids) -> int:
        """Mark records as used; they will never be delivered again. Returns how many were pending."""
        entry_ids = list(entry_ids)
        return self._client.xack(self.stream, self.group, *entry_ids) if entry_ids else 0

    def pending(self) -> int:
        """Records delivered to some consumer of the group and not acked yet."""
        return int(self._client.xpending(self.stream, self.group)["pending"])

    def close(self) -> None:
        self._client.close()

    def _ensure_group(self) -> None:
        try:
            self._client.xgroup_create(self.stream, self.group, id=self._start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read_new(self, count: int, block_ms: int | None) -> list[tuple[bytes, dict]]:
        try:
            reply = self._client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):  # the stream key was deleted: start over rather than fail forever
                raise
            self._ensure_group()
            return []
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 (protocol=3 in the URL): {stream: [entries]}
            return next(iter(reply.values()))[0]
        return reply[0][1]  # RESP2: [[stream, entries]]

    def _reclaim(self, count: int) -> list[tuple[bytes, dict]]:
        """XAUTOCLAIM then fetch. JUSTID because Redis 6.2 returns trimmed entries as bare nils, losing their ids."""
        try:
            ids = self._client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_min_idle_ms,
                "0-0",
                count=count,
                justid=True,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()
            return []
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.stream, entry_id, entry_id)
        entries, gone = [], []
        for entry_id, found in zip(ids, pipe.execute()):
            if found:
                entries.append(found[0])
            else:
                gone.append(entry_id)
        if gone:
            self.trimmed += len(gone)
            log.warning("capture: %d pending records were trimmed before being used", len(gone))
            self.ack(gone)
        return entries

    def _decode(self, entries: list[tuple[bytes, dict]]) -> list[tuple[str, VerificationRecord]]:
        out = []
        for entry_id, fields in entries:
            data = fields.get(FIELD, b"")
            try:
                out.append((entry_id.decode(), decode(data)))
            except RecordFormatError as exc:
                self._set_aside(entry_id, data, exc)
        return out

    def _set_aside(self, entry_id: bytes, data: bytes, exc: Exception) -> None:
        """Dead-letter and ack in one transaction, so the bad entry is neither lost nor redelivered."""
        log.warning(
            "capture: entry %s does not decode (%s); moved to %s", entry_id, exc, self.dead_letter_stream
        )
        self.undecodable += 1
        metrics.RECORDS_UNDECODABLE.inc()
        pipe = self._client.pipeline(transaction=True)
        pipe.xadd(
            self.dead_letter_stream,
            {FIELD: data, b"entry_id": entry_id, b"error": str(exc)[:500]},
            maxlen=self.dead_letter_maxlen,
            approximate=True,
        )
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
