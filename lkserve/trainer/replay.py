"""Replay buffer: fresh traffic first, mixed with a reservoir of older traffic; a held-out slice never trained on.

- Split: a request is held out iff hash(request_id) falls below `heldout_fraction` (sha1, stable across workers and
  restarts), so every chunk of one request lands on the same side: no leakage of a request's own context.
- Fresh queue: train records not yet trained on (with their stream entry id, acked later by the state module).
- Reservoir: records already trained once, kept by reservoir sampling (uniform over everything seen) up to
  `reservoir_records`; a batch draws `replay_ratio` of its positions from it (0 = fresh only) to fight forgetting
  of older domains while traffic drifts.
- Held-out: the most recent `heldout_records` held-out records (a sliding window of recent traffic), for the gate.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass

from lkserve.capture.record import VerificationRecord


def is_heldout(request_id: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(request_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def base_request_id(request_id: str) -> str:
    """Chunks of one request share its id; drop a chunk suffix if the engine appended one ("rid#3")."""
    return request_id.split("#", 1)[0]


@dataclass
class Item:
    entry_id: str | None  # stream entry id (None: not from the stream, e.g. restored from a checkpoint)
    record: VerificationRecord

    @property
    def positions(self) -> int:
        return self.record.num_positions


class ReplayBuffer:
    """Sizes and ratios: TrainerSettings (heldout_fraction, heldout_records, reservoir_records, replay_ratio, seed)."""

    def __init__(self, heldout_fraction: float, heldout_records: int, reservoir_records: int, replay_ratio: float,
                 seed: int):
        self.heldout_fraction = heldout_fraction
        self.replay_ratio = replay_ratio
        self.reservoir_records = reservoir_records
        self.fresh: deque[Item] = deque()
        self.reservoir: list[VerificationRecord] = []
        self.heldout: deque[VerificationRecord] = deque(maxlen=heldout_records)
        self.seen_train = 0  # records that went through the reservoir sampler
        self.rng = random.Random(seed)

    # -- intake -----------------------------------------------------------------------------------------------
    def split(self, record: VerificationRecord) -> str:
        return "heldout" if is_heldout(base_request_id(record.request_id), self.heldout_fraction) else "train"

    def add(self, entry_id: str | None, record: VerificationRecord) -> str:
        side = self.split(record)
        if side == "heldout":
            self.heldout.append(record)
        elif record.num_positions:
            self.fresh.append(Item(entry_id, record))
        return side

    @property
    def fresh_positions(self) -> int:
        return sum(i.positions for i in self.fresh)

    # -- batches ----------------------------------------------------------------------------------------------
    def next_batch(self, budget: int) -> tuple[list[Item], list[VerificationRecord]]:
        """(fresh items, replayed records) for one step of about `budget` positions. Fresh items are moved to the
        reservoir (they are "trained" once the caller runs the step)."""
        replay_budget = int(budget * self.replay_ratio) if self.reservoir else 0
        fresh, n = [], 0
        while self.fresh and (not fresh or n + self.fresh[0].positions <= budget - replay_budget):
            item = self.fresh.popleft()
            fresh.append(item)
            n += item.positions
        replay, m = [], 0
        if self.reservoir:
            budget_left = replay_budget
            tries = 0
            while m < budget_left and tries < 4 * len(self.reservoir):
                r = self.rng.choice(self.reservoir)
                tries += 1
                if m and m + r.num_positions > budget_left:
                    break
                replay.append(r)
                m += r.num_positions
        for item in fresh:
            self._to_reservoir(item.record)
        return fresh, replay

    def _to_reservoir(self, record: VerificationRecord) -> None:
        self.seen_train += 1
        if len(self.reservoir) < self.reservoir_records:
            self.reservoir.append(record)
        else:
            j = self.rng.randrange(self.seen_train)
            if j < self.reservoir_records:
                self.reservoir[j] = record

    # -- state (for training-state checkpoints) ---------------------------------------------------------------
    def state(self) -> dict:
        from lkserve.capture.codec import encode

        return {"reservoir": [encode(r) for r in self.reservoir], "heldout": [encode(r) for r in self.heldout],
                "seen_train": self.seen_train, "rng": self.rng.getstate()}

    def load_state(self, state: dict) -> None:
        from lkserve.capture.codec import decode

        self.reservoir = [decode(b) for b in state["reservoir"]]
        self.heldout.clear()
        self.heldout.extend(decode(b) for b in state["heldout"])
        self.seen_train = int(state["seen_train"])
        self.rng.setstate(state["rng"])
