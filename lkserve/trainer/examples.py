"""Capture records -> training/evaluation batches for the draft.

A record holds a context (prompt + emitted tokens) and, for each verified drafted position p, the target's top-k
distribution predicting context[p] from context[:p]. A causal LM run on context[:L] gives at logits row t the
distribution of token t + 1, so the draft row for position p is row p - 1 of the same sequence: one forward pass
per record covers all of its positions (the draft at serving time saw exactly context[:p], because every earlier
draft token of the block was accepted, or the position would not have been verified).

Layout of a batch (left-aligned, right-padded):

    input_ids      [B, L]  context[start : last position] per record, padded with pad_id
    attention_mask [B, L]  1 on real tokens
    row_b, row_t   [N]     the logits row of each target row: hidden[row_b, row_t] predicts the drafted token
    target         SparseTarget(ids [N, k], probs [N, k], residual [N]); ids -1 pad rows of a smaller k
    draft_position [N]     draft_index (0..K-1): weight gamma^(n-1), per-position alpha/lambda
    temperature    [N]     the request's temperature; the draft's q at serving time is softmax(logits / T)
                           (vLLM's proposer ignores top-p/top-k for the draft), T ~ 0 = greedy

Long contexts are cut to the `max_context` tokens that end at the record's last position; positions whose prefix
falls outside that window are dropped (counted in `dropped_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lkserve.capture.record import VerificationRecord
from lkserve.losses import SparseTarget

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperature below this is greedy


class RowTemperature:
    """Helpers of a batch with one target row per drafted position and its request's `temperature` [N]."""

    row_b: torch.Tensor
    temperature: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.row_b.shape[0])

    def logit_temperature(self) -> torch.Tensor:
        """[N] divisor of the draft logits: T, or 1 for greedy rows (vLLM does the same before its argmax)."""
        return torch.where(self.temperature > GREEDY_EPS, self.temperature, torch.ones_like(self.temperature))

    def divisor(self) -> torch.Tensor | None:
        """logit_temperature(), or None when every divisor is 1 (x / 1 == x exactly: T = 1 bootstrap records then
        skip an [N, V] pass and its backward)."""
        t = self.logit_temperature()
        return None if bool((t == 1).all()) else t

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, V] / logit_temperature()[:, None] (the logits themselves when every divisor is 1)."""
        t = self.divisor()
        return logits if t is None else logits / t[:, None]

    @property
    def greedy(self) -> torch.Tensor:
        return self.temperature <= GREEDY_EPS


@dataclass
class Batch(RowTemperature):
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    row_b: torch.Tensor  # [N] long
    row_t: torch.Tensor  # [N] long
    target: SparseTarget  # ids [N, k] long (-1 = padding), probs [N, k] fp32, residual [N] fp32
    draft_position: torch.Tensor  # [N] long
    temperature: torch.Tensor  # [N] fp32 (the request's; <= GREEDY_EPS means greedy)
    record_index: torch.Tensor  # [N] long: which record of `records` the row came from
    num_records: int
    dropped_positions: int = 0


def target_rows(record: VerificationRecord, sel: np.ndarray, k_max: int):
    """The logged target of positions `sel` of a record, padded to k_max columns: (ids [n, k_max] int64, -1 =
    padding; probs [n, k_max] fp32; residual [n] fp32 clipped to [0, 1])."""
    n, k = len(sel), int(record.topk_ids.shape[1])
    ids = np.full((n, k_max), -1, dtype=np.int64)
    probs = np.zeros((n, k_max), dtype=np.float32)
    ids[:, :k] = record.topk_ids[sel]
    probs[:, :k] = record.topk_probs[sel].astype(np.float32)
    return ids, probs, np.clip(record.residual[sel].astype(np.float32), 0.0, 1.0)


def build_batch(records: list[VerificationRecord], max_context: int = 2048, pad_id: int = 0,
                num_positions: int | None = None) -> Batch:
    """One batch from whole records (split the record list by position budget with `split_by_positions`).
    Positions with draft_index >= num_positions (if given) are dropped."""
    seqs, rows_b, rows_t, ids, probs, resid, dpos, temps, rec_idx = [], [], [], [], [], [], [], [], []
    dropped = 0
    k_max = max((int(r.topk_ids.shape[1]) for r in records if r.num_positions), default=1)
    for r in records:
        pos = np.asarray(r.positions, dtype=np.int64)
        keep = pos >= 1  # position 0 has no prefix
        if num_positions is not None:
            keep &= np.asarray(r.draft_index, dtype=np.int64) < num_positions
        if not keep.any():
            dropped += int((~keep).sum())
            continue
        end = int(pos[keep].max())  # input = context[start:end]; row of position p is p - 1 - start
        start = max(0, end - max_context)
        keep &= pos - 1 >= start
        dropped += int((~keep).sum())
        if not keep.any():
            continue
        b = len(seqs)
        seqs.append(np.asarray(r.context_token_ids[start:end], dtype=np.int64))
        sel = np.nonzero(keep)[0]
        n = len(sel)
        rows_b.append(np.full(n, b, dtype=np.int64))
        rows_t.append(pos[sel] - 1 - start)
        tid, tpr, res = target_rows(r, sel, k_max)
        ids.append(tid)
        probs.append(tpr)
        resid.append(res)
        dpos.append(np.asarray(r.draft_index[sel], dtype=np.int64))
        temps.append(np.full(n, float(r.temperature), dtype=np.float32))
        rec_idx.append(np.full(n, len(rec_idx), dtype=np.int64))  # index among kept records
    if not seqs:
        raise ValueError("no usable positions in these records")
    L = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    cat = lambda xs: torch.from_numpy(np.concatenate(xs))
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        row_b=cat(rows_b),
        row_t=cat(rows_t),
        target=SparseTarget(cat(ids), cat(probs), cat(resid)),
        draft_position=cat(dpos),
        temperature=cat(temps),
        record_index=cat(rec_idx),
        num_records=len(seqs),
        dropped_positions=dropped,
    )


def split_by_positions(records: list, budget: int, key=lambda r: r) -> list[list]:
    """Consecutive groups of records with about `budget` positions each (a record is never split)."""
    groups, cur, n = [], [], 0
    for item in records:
        p = key(item).num_positions
        if cur and n + p > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(item)
        n += p
    if cur:
        groups.append(cur)
    return groups


# A batch pads every record to the longest; the rows of a record only ever need its positions up to its last row
# (attention is causal: later positions and padding never change an earlier one). When the padding would be more than
# PACK_WASTE of the work, the trainers run each record on its own, cut to what its rows need, and gather the rows from
# the concatenation: the same hidden states (up to matmul rounding), without computing the padding.
# Only on one torch thread (the trainer's default): B times as many small ops each pay an intra-op fork/join, and on
# the shared 2-core machine with 2 threads that cost more than the padding saved (bench/train_speed.py, 2026-12-03:
# EAGLE-3 head 112 -> 32 positions/s at 2 threads, while 1 thread went 294 -> 346).
PACK_WASTE = 0.1


def needed_lengths(row_b: torch.Tensor, row_t: torch.Tensor, num_records: int) -> torch.Tensor:
    """[B] long: 1 + the last row position of each record (0 for a record without rows)."""
    return torch.zeros(num_records, dtype=torch.long).scatter_reduce(0, row_b, row_t + 1, "amax")


def per_record(lengths: torch.Tensor, padded_length: int) -> bool:
    """True when running the records one by one saves more than PACK_WASTE of the padded work (one thread only)."""
    return len(lengths) > 1 and torch.get_num_threads() == 1 and \
        int(lengths.sum()) < (1 - PACK_WASTE) * len(lengths) * padded_length
