"""The LK losses and their baselines, as a trainer calls them.

Every loss takes the draft's LOGITS and the target's PROBABILITIES for N rows (batch x sequence x draft
position, flattened):

    draft_logits    [N, V_draft]  any float dtype; bf16/fp16 are upcast to fp32 (fp64 stays fp64); or a
                    HeadRows(hidden [N, H], head weight [V_draft, H], divisor [N]): the logits hidden @ W.T / divisor,
                    never materialised for sparse targets (the trainers pass this: see sparse.py)
    target          dense probabilities [N, V_target], or a SparseTarget (top-k ids/probs + residual)
    draft_position  [N] long, 0..K-1: index of the row's draft token within the draft block
    mask            [N] bool or None; False rows (padding) are dropped, so they may hold anything, even NaN
    d2t             [V_draft] long plain draft->target id map for a truncated draft vocabulary (see vocab.py),
                    or None when both share one vocabulary (V_draft == V_target)

and returns LossOutput(loss, alpha_per_position, lambda_per_position). The loss is
sum_n gamma^(n-1) * mean_rows_at_position_n(per-row loss). Temperature is the caller's business: pass
draft logits / T and target probabilities at the serving temperature T.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense import ALPHA_EPS, acceptance, dense_kl, target_on_draft_vocab
from .sparse import (
    HeadRows,
    SparseTarget,
    fused_head_log_q,
    fused_log_q,
    logged_log_q,
    sparse_alpha,
    sparse_kl,
    sparse_kl_from,
)
from .weights import lk_lambda, mean_per_position, weighted_position_loss

Target = Tensor | SparseTarget


class LossOutput(NamedTuple):
    loss: Tensor  # [] scalar to backpropagate
    alpha_per_position: Tensor  # [K] mean acceptance per draft position, detached, for logging (NaN: no rows)
    lambda_per_position: Tensor | None  # [K] KL weight of lk_lambda_loss, detached; None for the other losses


# The sparse terms go through sparse.fused_log_q (no [N, V] log q; a few passes over the logits instead of ~17).
# False: the reference path (log_softmax, gather, logsumexp over a scattered copy), kept for tests and benchmarks.
FUSED_SPARSE = True


def per_row_terms(draft_logits: Tensor, target: Target, *, d2t: Tensor | None = None, with_kl: bool = True,
                  alpha_grad: bool = True, fused: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """(alpha [N], KL(p || q) [N] or None) per row: the building blocks of every loss here.
    Sparse targets give the bounds described in sparse.py. alpha_grad=False: alpha only for logging.
    fused (None: FUSED_SPARSE): sparse targets through fused_log_q, equal to the reference within rounding.
    draft_logits may be a HeadRows (the LM head's inputs): sparse targets then go through fused_head_log_q, a block
    of rows at a time; otherwise its logits are computed first."""
    fused = FUSED_SPARSE if fused is None else fused
    if isinstance(draft_logits, HeadRows):
        if isinstance(target, SparseTarget) and fused:
            log_q_ids, draft_ids, log_q_other = fused_head_log_q(draft_logits, target, d2t, with_other=with_kl)
            alpha = sparse_alpha(log_q_ids if alpha_grad else log_q_ids.detach(), target)
            kl = sparse_kl_from(log_q_ids, log_q_other, draft_ids, target, renormalise=d2t is not None) \
                if with_kl else None
            return alpha, kl
        draft_logits = draft_logits.logits()
    z = draft_logits.to(torch.promote_types(draft_logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    if isinstance(target, SparseTarget) and fused:
        log_q_ids, draft_ids, log_q_other = fused_log_q(z, target, d2t, with_other=with_kl)
        alpha = sparse_alpha(log_q_ids if alpha_grad else log_q_ids.detach(), target)
        kl = sparse_kl_from(log_q_ids, log_q_other, draft_ids, target, renormalise=d2t is not None) if with_kl \
            else None
        return alpha, kl
    if isinstance(target, SparseTarget):
        log_q = F.log_softmax(z, dim=-1)  # [N, V_draft]
        log_q_ids, draft_ids = logged_log_q(log_q, target, d2t)  # [N, k], [N, k]
        alpha = sparse_alpha(log_q_ids if alpha_grad else log_q_ids.detach(), target)
        kl = sparse_kl(log_q, log_q_ids, draft_ids, target, renormalise=d2t is not None) if with_kl else None
        return alpha, kl
    p = target_on_draft_vocab(target, d2t).to(z.dtype)  # [N, V_draft], not renormalised
    alpha = acceptance(p, F.softmax(z if alpha_grad else z.detach(), dim=-1))
    kl = dense_kl(F.log_softmax(z, dim=-1), p, renormalise=d2t is not None) if with_kl else None
    return alpha, kl


def _loss(kind: str, draft_logits: Tensor, target: Target, draft_position: Tensor, mask: Tensor | None,
          d2t: Tensor | None, gamma: float, eta: float, num_positions: int | None) -> LossOutput:
    if mask is not None:  # drop padded rows up front: cheaper than masking, and immune to garbage in them
        draft_logits = draft_logits.select(mask) if isinstance(draft_logits, HeadRows) else draft_logits[mask]
        draft_position = draft_position[mask]
        target = SparseTarget(*(t[mask] for t in target)) if isinstance(target, SparseTarget) else target[mask]
    position = draft_position.long()  # [N]
    if num_positions is None:  # pass it explicitly for diagnostics of a fixed size [K]
        num_positions = int(position.max()) + 1 if position.numel() else 1

    # KL alone only needs alpha for logging: no graph for it.
    alpha, kl = per_row_terms(draft_logits, target, d2t=d2t, with_kl=kind in ("kl", "lambda"),
                              alpha_grad=kind != "kl")  # [N], [N] or None
    alpha_per_position = mean_per_position(alpha.detach(), position, num_positions)  # [K]
    lam = None
    if kind == "alpha":
        per_row = -alpha.clamp_min(ALPHA_EPS).log()  # finite (<= 87.5) even when alpha == 0
    elif kind == "tv":
        per_row = 1 - alpha
    elif kind == "kl":
        per_row = kl
    else:
        lam = lk_lambda(alpha_per_position, eta)  # [K], one per draft position
        lam_row = lam[position]  # [N]
        per_row = lam_row * kl + (1 - lam_row) * (1 - alpha)
    loss = weighted_position_loss(per_row, position, num_positions, gamma)
    return LossOutput(loss, alpha_per_position, lam)


def lk_alpha_loss(draft_logits: Tensor, target: Target, draft_position: Tensor, mask: Tensor | None = None, *,
                  d2t: Tensor | None = None, gamma: float = 0.8, num_positions: int | None = None) -> LossOutput:
    """LK-alpha: -log alpha. Its gradient is grad TV / alpha: TV's direction (the acceptance rate itself), scaled
    up where alpha is small, which is what pure TV lacks from scratch. Equals cross-entropy for a one-hot p."""
    return _loss("alpha", draft_logits, target, draft_position, mask, d2t, gamma, 0.0, num_positions)


def lk_lambda_loss(draft_logits: Tensor, target: Target, draft_position: Tensor, mask: Tensor | None = None, *,
                   d2t: Tensor | None = None, gamma: float = 0.8, eta: float = 3.0,
                   num_positions: int | None = None) -> LossOutput:
    """LK-lambda: lambda * KL + (1 - lambda) * TV with lambda = exp(-eta * sg[alpha]) per draft position, alpha
    averaged over the valid rows of that position (batch and sequence). KL while the draft is poor, TV (the
    acceptance rate) once it is good. eta = 3 in the paper (10 for MEDUSA heads)."""
    return _loss("lambda", draft_logits, target, draft_position, mask, d2t, gamma, eta, num_positions)


def kl_loss(draft_logits: Tensor, target: Target, draft_position: Tensor, mask: Tensor | None = None, *,
            d2t: Tensor | None = None, gamma: float = 0.8, num_positions: int | None = None) -> LossOutput:
    """Forward KL(p || q), the usual distillation baseline. With d2t, p is renormalised over the draft vocabulary
    (KL is infinite otherwise)."""
    return _loss("kl", draft_logits, target, draft_position, mask, d2t, gamma, 0.0, num_positions)


def tv_loss(draft_logits: Tensor, target: Target, draft_position: Tensor, mask: Tensor | None = None, *,
            d2t: Tensor | None = None, gamma: float = 0.8, num_positions: int | None = None) -> LossOutput:
    """Total variation TV = 1 - alpha (= 1/2 sum |p - q| over the target vocabulary, for normalised p).
    Optimises acceptance directly but its gradient is tiny for a poor draft over a large vocabulary."""
    return _loss("tv", draft_logits, target, draft_position, mask, d2t, gamma, 0.0, num_positions)
