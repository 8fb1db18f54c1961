"""Automatic rollback from live acceptance, and the manual rollback the CLI/admin call.

Live acceptance of a version = accepted / verified drafted positions over the capture records tagged with that
`draft_version` (records keep every verified position: all draft tokens up to and including the first rejected
one, so this is the per-position acceptance rate the sampler actually saw, i.e. an estimate of alpha).

Rule: once the current version has `window_tokens` verified positions in its latest window, and the previous
version has at least `min_baseline_tokens` in its own latest window, roll back if
    rate(current) < rate(previous) - margin.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from lkserve.drafts import DraftRegistry

log = logging.getLogger("lkserve.worker")


class _Window:
    def __init__(self, tokens: int):
        self.tokens = tokens
        self.items: deque[tuple[int, int]] = deque()
        self.verified = 0
        self.accepted = 0
        self.total_verified = 0

    def add(self, verified: int, accepted: int) -> None:
        self.items.append((verified, accepted))
        self.verified += verified
        self.accepted += accepted
        self.total_verified += verified
        while self.items and self.verified - self.items[0][0] >= self.tokens:
            v, a = self.items.popleft()
            self.verified -= v
            self.accepted -= a

    @property
    def rate(self) -> float:
        return self.accepted / self.verified if self.verified else float("nan")


@dataclass
class RollbackDecision:
    rollback: bool
    version: str
    previous: str
    rate: float
    previous_rate: float
    tokens: int
    reason: str


class RollbackMonitor:
    def __init__(self, window_tokens: int = 2000, margin: float = 0.05, min_baseline_tokens: int | None = None):
        self.window_tokens = window_tokens
        self.margin = margin
        self.min_baseline_tokens = window_tokens // 2 if min_baseline_tokens is None else min_baseline_tokens
        self.windows: dict[str, _Window] = {}

    def observe(self, record) -> None:
        n = int(record.num_positions)
        if n == 0:
            return
        w = self.windows.setdefault(record.draft_version, _Window(self.window_tokens))
        w.add(n, int(record.accepted.sum()))

    def rate(self, version: str) -> float:
        w = self.windows.get(version)
        return w.rate if w else float("nan")

    def tokens(self, version: str) -> int:
        w = self.windows.get(version)
        return w.verified if w else 0

    def check(self, current: str | None, previous: str | None) -> RollbackDecision | None:
        """None while there is not enough evidence; else the decision."""
        if not current or not previous or current == previous:
            return None
        cur, prev = self.windows.get(current), self.windows.get(previous)
        if cur is None or prev is None or cur.verified < self.window_tokens or prev.verified < self.min_baseline_tokens:
            return None
        bad = cur.rate < prev.rate - self.margin
        reason = (f"live acceptance of {current} {cur.rate:.3f} over {cur.verified} tokens "
                  f"{'<' if bad else '>='} {previous}'s {prev.rate:.3f} - {self.margin}")
        return RollbackDecision(bad, current, previous, cur.rate, prev.rate, cur.verified, reason)


def manual_rollback(registry: DraftRegistry, to: str | None = None, reason: str = "manual rollback") -> dict:
    """Announce `to` (default: the previous version); for the CLI / admin API."""
    ann = registry.rollback(to=to, reason=reason)
    log.warning("rolled back to %s (%s)", ann["version"], reason)
    return ann
