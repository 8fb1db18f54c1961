"""Held-out acceptance of a draft, computed exactly from the logged top-k, and the publish gate.

alpha at a drafted position = sum over the logged top-k tokens of min(p(x), q(x)), with p the target's logged
probabilities (after the request's temperature/top-p/top-k) and q the draft's serving distribution: softmax(logits /
T) (vLLM's proposer applies only the temperature to the draft), or one-hot argmax for greedy requests. The tokens the
log does not name would add sum min(p, q) >= 0, so this is a lower bound of the true alpha, exact when k = V.

Expected tokens per verification step (tau) with K draft tokens, from per-position alphas a_1..a_K:

    tau = 1 + sum_{n=1..K} prod_{j<=n} a_j

ASSUMPTION: acceptance at position n is independent of what happened at positions < n, given that they were
accepted (a_n is measured on positions whose prefix was accepted, which is what the log holds, but the product
treats the events as independent across positions). +1 is the bonus/correction token every step emits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lkserve.capture.record import VerificationRecord
from lkserve.trainer.examples import build_batch, split_by_positions
from lkserve.trainer.train import q_from_logits, row_logits


@dataclass
class EvalResult:
    alpha_per_position: list[float]  # [K] mean alpha of the rows at draft position n (NaN: none)
    count_per_position: list[int]  # [K]
    alpha_mean: float  # mean over all rows
    rows: int
    tau: float  # chain formula, NaN positions treated as 0 (no evidence -> no credit)

    def as_dict(self) -> dict:
        """JSON-safe (None, not NaN, at a position with no rows), so a saved and reloaded result compares equal."""
        alphas = [None if math.isnan(a) else a for a in self.alpha_per_position]
        return {"alpha_mean": self.alpha_mean, "tau": self.tau, "rows": self.rows,
                "alpha_per_position": alphas, "count_per_position": self.count_per_position}


def chain_tau(alpha_per_position) -> float:
    """tau = 1 + sum_n prod_{j<=n} a_j (independence across positions assumed; see the module docstring)."""
    tau, prod = 1.0, 1.0
    for a in alpha_per_position:
        a = 0.0 if a is None or (isinstance(a, float) and math.isnan(a)) else float(a)
        prod *= a
        tau += prod
    return tau


@torch.no_grad()
def row_alphas(model, records: list[VerificationRecord], batch_positions: int = 1024, max_context: int = 2048,
               num_positions: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha [N], draft_position [N]) over every usable logged position of `records`."""
    alphas, positions = [], []
    for group in split_by_positions(records, batch_positions):
        try:
            batch = build_batch(group, max_context=max_context, num_positions=num_positions)
        except ValueError:
            continue
        q = q_from_logits(row_logits(model, batch), batch)  # [N, V]
        ids = batch.target.ids
        q_ids = q.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0)
        alphas.append(torch.minimum(batch.target.probs, q_ids).sum(-1))
        positions.append(batch.draft_position)
    if not alphas:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(alphas), torch.cat(positions)


def summarise(alpha: torch.Tensor, position: torch.Tensor, num_positions: int) -> EvalResult:
    """EvalResult of per-row alphas [N] at draft positions [N] (draft-model and EAGLE-3 evaluations alike)."""
    per, counts = [], []
    for n in range(num_positions):
        sel = alpha[position == n]
        counts.append(int(sel.numel()))
        per.append(float(sel.mean()) if sel.numel() else float("nan"))
    mean = float(alpha.mean()) if alpha.numel() else float("nan")
    return EvalResult(per, counts, mean, int(alpha.numel()), chain_tau(per))


def evaluate(model, records: list[VerificationRecord], num_positions: int = 4, batch_positions: int = 1024,
             max_context: int = 2048) -> EvalResult:
    alpha, pos = row_alphas(model, records, batch_positions, max_context, num_positions)
    return summarise(alpha, pos, num_positions)


@dataclass
class GateDecision:
    publish: bool
    reason: str
    candidate: EvalResult
    serving: EvalResult
    margin: float
    metric: str = "alpha_mean"
    details: dict = field(default_factory=dict)

    @property
    def improvement(self) -> float:
        return getattr(self.candidate, self.metric) - getattr(self.serving, self.metric)


class Gate:
    """Publish only if candidate beats serving on the SAME held-out records by `margin` (absolute, on `metric`:
    "alpha_mean" or "tau"), with at least `min_rows` held-out positions."""

    def __init__(self, margin: float = 0.005, metric: str = "alpha_mean", min_rows: int = 64, num_positions: int = 4,
                 batch_positions: int = 1024, max_context: int = 2048, evaluate=None):
        """`evaluate(model, records) -> EvalResult` (default: a draft model's, with the three sizes above); the worker
        passes its draft kind's (lkserve/trainer/drafts.py)."""
        if metric not in ("alpha_mean", "tau"):
            raise ValueError(f"gate metric must be alpha_mean or tau, got {metric!r}")
        self.margin, self.metric, self.min_rows = margin, metric, min_rows
        self.num_positions, self.batch_positions, self.max_context = num_positions, batch_positions, max_context
        self._evaluate = evaluate

    def evaluate(self, model, records) -> EvalResult:
        if self._evaluate is not None:
            return self._evaluate(model, records)
        return evaluate(model, records, self.num_positions, self.batch_positions, self.max_context)

    def decide(self, candidate_model, serving_model, heldout: list[VerificationRecord],
               serving_result: EvalResult | None = None) -> GateDecision:
        cand = self.evaluate(candidate_model, heldout)
        serv = serving_result if serving_result is not None else self.evaluate(serving_model, heldout)
        return self.compare(cand, serv)

    def compare(self, cand: EvalResult, serv: EvalResult) -> GateDecision:
        if cand.rows < self.min_rows:
            return GateDecision(False, f"only {cand.rows} held-out positions (< {self.min_rows})", cand, serv,
                                self.margin, self.metric)
        c, s = getattr(cand, self.metric), getattr(serv, self.metric)
        if c >= s + self.margin:
            return GateDecision(True, f"{self.metric} {c:.4f} >= serving {s:.4f} + {self.margin}", cand, serv,
                                self.margin, self.metric)
        return GateDecision(False, f"{self.metric} {c:.4f} < serving {s:.4f} + {self.margin}", cand, serv,
                            self.margin, self.metric)
