"""Crash safety: training-state checkpoints and the ack protocol.

Invariant: a stream entry is acked only after a DURABLE training-state checkpoint includes its effect (its gradient
step is in the saved model/optimizer, or it sits in the saved held-out/reservoir state). So:

- crash before the checkpoint: the entry is still pending in the consumer group; on restart the worker reloads the
  older checkpoint (which does not include it) and re-reads its own pending entries (XREADGROUP id 0): trained
  again exactly once, from the state that never saw it;
- crash after the checkpoint but before the ack: the checkpoint lists the entry ids it includes; on restart those
  are acked without training (no double training);
- entries of a crashed OTHER consumer come back through XAUTOCLAIM in StreamReader.read.

The checkpoint is one file written as tmp + fsync + rename + fsync(dir): either the old or the new one is on disk.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from lkserve.capture.codec import decode
from lkserve.capture.writer import FIELD

log = logging.getLogger("lkserve.worker")

STATE_FILE = "training-state.pt"


class TrainingStateStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE

    def save(self, state: dict) -> float:
        """Atomic, durable write. Returns seconds taken."""
        t0 = time.perf_counter()
        tmp = self.dir / f".{STATE_FILE}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(str(self.dir), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)


class AckTracker:
    """Which stream entries are held in memory, absorbed into the state since the last checkpoint, or included in
    the last durable checkpoint but not yet acked."""

    def __init__(self):
        self.held: set[str] = set()  # read and not yet acked (fresh queue, absorbed, or checkpointed-unacked)
        self.absorbed: list[str] = []  # effect in the in-memory state, not yet in a durable checkpoint
        self.unacked: list[str] = []  # in a durable checkpoint, ack pending (e.g. Redis was down)
        self.skip: set[str] = set()  # from a restored checkpoint: included already, ack without using

    def seen(self, entry_id: str) -> bool:
        return entry_id in self.held

    def hold(self, entry_id: str) -> None:
        self.held.add(entry_id)

    def absorb(self, entry_ids) -> None:
        self.absorbed.extend(e for e in entry_ids if e is not None)

    def to_checkpoint(self) -> list[str]:
        """Ids the next checkpoint includes (absorbed + still unacked from before)."""
        return self.unacked + self.absorbed

    def checkpointed(self) -> None:
        self.unacked = self.unacked + self.absorbed
        self.absorbed = []

    def ack(self, reader) -> int:
        if not self.unacked:
            return 0
        ids = self.unacked
        try:
            reader.ack(ids)
        except Exception as e:  # noqa: BLE001 - Redis down: retry at the next checkpoint
            log.warning("ack of %d entries failed (%r); will retry", len(ids), e)
            return 0
        self.held.difference_update(ids)
        self.unacked = []
        return len(ids)


def read_own_pending(client, stream: str, group: str, consumer: str, count: int = 256):
    """All entries delivered to `consumer` and never acked (XREADGROUP with id 0), oldest first, decoded.
    Entries trimmed from the stream (no fields) or undecodable are acked and skipped."""
    out, last = [], "0"
    while True:
        reply = client.xreadgroup(group, consumer, {stream: last}, count=count)
        entries = reply[0][1] if reply else []
        if not entries:
            return out
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            last = eid
            if not fields:
                client.xack(stream, group, eid)
                continue
            try:
                out.append((eid, decode(fields[FIELD])))
            except Exception as e:  # noqa: BLE001
                log.warning("pending entry %s does not decode (%r); acked and skipped", eid, e)
                client.xack(stream, group, eid)
