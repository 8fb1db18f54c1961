"""EAGLE-3 head training: batches from capture records that carry the target's auxiliary hidden states, the
online trainer and held-out evaluation. The module itself is lkserve.models.eagle3_head.Eagle3Head.

With a_j the target's aux hidden states at position j, training-time test unrolls what vLLM runs for every
position j of a window at once (see lkserve/models/eagle3_head.py). With teacher forcing the tokens fed to step k
are the context tokens x_{j+1+k}: the record only holds positions whose earlier drafts were accepted, so they are
the draft tokens the head really saw. Step k at j predicts x_{j+2+k}.

Every captured target distribution (at position p) is a label for EVERY step k (at j = p - 2 - k): the target's
distribution of x_p given x_<p does not depend on which draft step proposed x_p. Per-step loss weights gamma^k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lkserve import losses
from lkserve.capture.record import VerificationRecord, hidden_states_array
from lkserve.losses import SparseTarget
from lkserve.models.eagle3_head import Eagle3Head
from lkserve.trainer.examples import (
    RowTemperature,
    needed_lengths,
    per_record,
    split_by_positions,
    target_rows,
)
from lkserve.trainer.gate import EvalResult, summarise
from lkserve.trainer.train import (
    LOSSES,
    PRECISIONS,
    StepResult,
    autocast,
    head_rows,
    keep_freed_memory,
    q_from_logits,
    scheduled_lr,
    train_step,
)

# ----------------------------------------------------------------------------------------------------------------
# Batches from records with hidden states
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Eagle3Batch(RowTemperature):
    tokens: torch.Tensor  # [B, L + K] long
    aux: torch.Tensor  # [B, L, D] float
    pos0: torch.Tensor  # [B] long: absolute position of index 0
    row_b: torch.Tensor  # [N]
    row_j: torch.Tensor  # [N]
    step: torch.Tensor  # [N] long: TTT step k (the draft position of the row)
    served: torch.Tensor  # [N] bool: the record's draft_index == step (the row is what serving drafted)
    target: SparseTarget
    temperature: torch.Tensor  # [N]
    num_records: int
    dropped_positions: int = 0


def build_eagle3_batch(records: list[VerificationRecord], num_steps: int, max_context: int = 2048,
                       all_steps: bool = True, dtype=torch.float32) -> Eagle3Batch:
    """Rows for every labelled position p of every record and every step k < num_steps (all_steps) or only the
    step that served it (draft_index). Records without hidden states are skipped (counted as dropped).
    One loop that fills eleven parallel columns, then stacks them: split, the columns would have to be passed
    around together."""
    toks, auxs, pos0s, rb, rj, st, sv, ids, probs, resid, temps = ([] for _ in range(11))
    dropped = 0
    k_max = max((int(r.topk_ids.shape[1]) for r in records if r.num_positions), default=1)
    for r in records:
        hs = hidden_states_array(r)
        if hs is None or r.num_positions == 0:
            dropped += r.num_positions
            continue
        h0 = int(r.hidden_start)
        n_h = hs.shape[0]
        start = max(h0, h0 + n_h - max_context)
        hs = hs[start - h0:]
        L = hs.shape[0]
        pos = np.asarray(r.positions, dtype=np.int64)
        didx = np.asarray(r.draft_index, dtype=np.int64)
        steps = range(num_steps) if all_steps else None
        sel_i, sel_j, sel_k = [], [], []
        for i, p in enumerate(pos):
            ks = steps if steps is not None else ([int(didx[i])] if didx[i] < num_steps else [])
            for k in ks:
                j = int(p) - 2 - k - start
                if 0 <= j < L:
                    sel_i.append(i), sel_j.append(j), sel_k.append(k)
        if not sel_i:
            dropped += len(pos)
            continue
        b = len(toks)
        ctx = np.asarray(r.context_token_ids, dtype=np.int64)
        t = np.zeros(L + num_steps, dtype=np.int64)
        seg = ctx[start: start + L + num_steps]
        t[: len(seg)] = seg
        toks.append(t)
        auxs.append(torch.from_numpy(hs).to(dtype))
        pos0s.append(start)
        sel_i = np.asarray(sel_i)
        n = len(sel_i)
        rb.append(np.full(n, b))
        rj.append(np.asarray(sel_j))
        st.append(np.asarray(sel_k))
        sv.append(didx[sel_i] == np.asarray(sel_k))
        tid, tpr, res = target_rows(r, sel_i, k_max)
        ids.append(tid)
        probs.append(tpr)
        resid.append(res)
        temps.append(np.full(n, float(r.temperature), dtype=np.float32))
    if not toks:
        raise ValueError("no record with hidden states and usable positions")
    Lm = max(a.shape[0] for a in auxs)
    D = auxs[0].shape[1]
    aux = torch.zeros(len(auxs), Lm, D, dtype=dtype)
    tokens = torch.zeros(len(toks), Lm + num_steps, dtype=torch.long)
    for i, (a, t) in enumerate(zip(auxs, toks)):
        aux[i, : a.shape[0]] = a
        tokens[i, : len(t)] = torch.from_numpy(t)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs))
    return Eagle3Batch(tokens=tokens, aux=aux, pos0=torch.tensor(pos0s, dtype=torch.long), row_b=cat(rb).long(),
                       row_j=cat(rj).long(), step=cat(st).long(), served=cat(sv).bool(),
                       target=SparseTarget(cat(ids), cat(probs), cat(resid)), temperature=cat(temps),
                       num_records=len(toks), dropped_positions=dropped)


def row_hidden(head: Eagle3Head, batch: Eagle3Batch, num_steps: int) -> torch.Tensor:
    """The LM head's input [N, H] (normed) of the batch rows. Records of very different lengths run one by one,
    each cut to the positions its rows need (examples.per_record): no TTT step over padding."""
    B, L = batch.aux.shape[0], batch.aux.shape[1]
    need = needed_lengths(batch.row_b, batch.row_j, B)
    if not per_record(need, L):
        outs = head.unroll(batch.tokens, batch.aux, batch.pos0, num_steps)
        stacked = torch.stack(outs, 0)  # [K, B, L, H]
        return head.norm(stacked[batch.step, batch.row_b, batch.row_j])
    flat = []
    for b in range(B):
        n = int(need[b])
        if n:
            outs = head.unroll(batch.tokens[b: b + 1, : n + num_steps], batch.aux[b: b + 1, :n],
                               batch.pos0[b: b + 1], num_steps)
            flat.append(torch.stack(outs, 0)[:, 0])  # [K, n, H]
    offsets = torch.cumsum(need, 0) - need
    return head.norm(torch.cat(flat, 1)[batch.step, offsets[batch.row_b] + batch.row_j])


def row_logits(head: Eagle3Head, batch: Eagle3Batch, num_steps: int) -> torch.Tensor:
    """Draft-vocabulary logits [N, V_draft] of the batch rows (not divided by temperature): head.logits."""
    return head.lm_head(row_hidden(head, batch, num_steps))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (held-out alpha, exactly as the gate computes it for draft models)
# ----------------------------------------------------------------------------------------------------------------


def serving_q_on_target_ids(head: Eagle3Head, logits: torch.Tensor, batch: Eagle3Batch) -> torch.Tensor:
    """q of the logged target ids [N, k]: softmax(logits / T) over the draft vocabulary (one-hot argmax for greedy
    rows), 0 for ids outside the draft vocabulary or padding."""
    q = q_from_logits(logits, batch)
    ids = batch.target.ids
    d2t = head.d2t_map
    draft_ids = ids.long() if d2t is None else losses.target_to_draft_ids(ids, d2t)
    out = q.gather(1, draft_ids.clamp_min(0))
    return out.masked_fill((draft_ids < 0) | (ids < 0), 0.0)


@torch.no_grad()
def row_alphas(head: Eagle3Head, records, num_steps: int, batch_positions: int = 256, max_context: int = 2048,
               served_only: bool = False):
    alphas, steps = [], []
    for group in split_by_positions(records, batch_positions):
        try:
            batch = build_eagle3_batch(group, num_steps, max_context, all_steps=not served_only)
        except ValueError:
            continue
        q_ids = serving_q_on_target_ids(head, row_logits(head, batch, num_steps), batch)
        alphas.append(torch.minimum(batch.target.probs, q_ids).sum(-1))
        steps.append(batch.step)
    if not alphas:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(alphas), torch.cat(steps)


def evaluate_head(head: Eagle3Head, records, num_steps: int = 4, batch_positions: int = 256,
                  max_context: int = 2048, served_only: bool = False) -> EvalResult:
    """Held-out acceptance per draft step (a lower bound from the logged top-k, as for draft models)."""
    was = head.training
    head.eval()
    alpha, step = row_alphas(head, records, num_steps, batch_positions, max_context, served_only)
    head.train(was)
    return summarise(alpha, step, num_steps)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class Eagle3Trainer:
    """Online training of an EAGLE-3 head with LK-lambda / LK-alpha / KL / TV on TTT-unrolled steps.

    `num_steps` = K draft positions unrolled (weights gamma^k). Truncated vocabularies go through the losses'
    `d2t` (target mass outside the draft vocabulary counts as zero acceptance; p is never renormalised for the
    LK/TV terms, only for KL)."""

    def __init__(self, head: Eagle3Head, *, loss: str = "lk_lambda", eta: float = 3.0, gamma: float = 0.8,
                 lr: float = 3e-3, grad_clip: float = 1.0, num_steps: int = 4, max_context: int = 2048,
                 warmup_steps: int = 0, lr_schedule: str = "constant", total_steps: int = 10_000,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, betas=(0.9, 0.95), all_steps: bool = True,
                 precision: str = "fp32"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; one of {sorted(LOSSES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
        self.precision = precision
        keep_freed_memory()
        self.model = head
        self.loss_name, self.eta, self.gamma = loss, eta, gamma
        self.base_lr, self.grad_clip, self.num_steps = lr, grad_clip, num_steps
        self.max_context, self.warmup_steps, self.all_steps = max_context, warmup_steps, all_steps
        self.lr_schedule, self.total_steps, self.min_lr_ratio = lr_schedule, total_steps, min_lr_ratio
        self.optimizer = torch.optim.AdamW(head.trainable_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        return scheduled_lr(step, self.base_lr, warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                            total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)

    def make_batch(self, records) -> Eagle3Batch:
        return build_eagle3_batch(records, self.num_steps, self.max_context, self.all_steps)

    def loss_on(self, batch: Eagle3Batch):
        with autocast(self.model, self.precision):
            hidden = row_hidden(self.model, batch, self.num_steps)
        logits = head_rows(self.model.lm_head, hidden, batch, self.precision)
        kw = {"gamma": self.gamma, "num_positions": self.num_steps, "d2t": self.model.d2t_map}
        if self.loss_name == "lk_lambda":
            kw["eta"] = self.eta
        return LOSSES[self.loss_name](logits, batch.target, batch.step, None, **kw)

    def step(self, batch: Eagle3Batch) -> StepResult:
        return train_step(self, batch, self.model.trainable_parameters())

    def state_dict(self) -> dict:
        return {"model": self.model.saved_state(), "optimizer": self.optimizer.state_dict(), "step": self.step_count,
                "loss": self.loss_name, "spec": asdict(self.model.spec)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
