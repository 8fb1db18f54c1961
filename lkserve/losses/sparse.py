"""Per-row terms for SPARSE top-k targets: the form logged at serving time.

A SparseTarget row holds the k most likely target tokens (ids, probs) and the mass of all the others (residual).
What we can compute from it, and how it relates to the dense quantity:

- alpha: sum over the k logged tokens of min(p_i, q(id_i)). The unlogged tokens would add
  sum min(p, q) >= 0, so this is a LOWER bound of the true alpha (exact for k = V); LK-alpha = -log alpha is an
  upper bound of the true LK-alpha.
- TV = 1 - alpha, consistent with that bound (an upper bound of the true TV).
- KL: between the coarsened distributions over k + 1 buckets: the logged tokens, plus one "other" bucket holding
  p's residual and q_other = 1 - sum q(ids):  sum_i p_i log(p_i / q(id_i)) + residual * log(residual / q_other).
  Merging tokens never increases KL (data-processing inequality), so this is a LOWER bound of the true KL, exact
  for k = V. q_other is computed as a logsumexp over the unlogged draft tokens, not as 1 - sum q(ids), which
  would cancel catastrophically when q is confident.

With a truncated draft vocabulary (d2t), logged tokens outside the draft vocabulary have q = 0: they add nothing
to alpha (the bound above still holds). For KL, p is renormalised over the draft vocabulary as in the dense
case, but the log cannot tell how the residual splits between draft and non-draft tokens: KL counts all of it
in the draft's "other" bucket. That keeps k = V exactly equal to the dense computation, but with d2t the sparse
KL is an estimate, no longer a guaranteed lower bound.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from .dense import LOG_ZERO, log_prob
from .vocab import target_to_draft_ids

LOG_Q_MIN = -87.3  # floor for log q_other: ~log of fp32's smallest normal, i.e. "q_other is 0"


class SparseTarget(NamedTuple):
    """Top-k target distribution for N rows, in the TARGET vocabulary."""

    ids: Tensor  # [N, k] long/int target token ids (distinct within a row)
    probs: Tensor  # [N, k] their target probabilities
    residual: Tensor  # [N] 1 - probs.sum(-1): target mass on the tokens not logged


def topk_target(p: Tensor, k: int) -> SparseTarget:
    """Keep the k most likely tokens of dense target probabilities p [N, V] (what the serving side logs)."""
    probs, ids = p.topk(k, dim=-1)
    return SparseTarget(ids, probs, (1 - probs.sum(-1)).clamp_min(0))


def logged_log_q(log_q: Tensor, target: SparseTarget, d2t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log q of the logged tokens [N, k] (LOG_ZERO outside the draft vocabulary) and their draft ids [N, k]
    (-1 outside the draft vocabulary). log_q: [N, V_draft]."""
    draft_ids = target.ids.long() if d2t is None else target_to_draft_ids(target.ids, d2t)
    log_q_ids = log_q.gather(1, draft_ids.clamp_min(0))
    return log_q_ids.masked_fill(draft_ids < 0, LOG_ZERO), draft_ids


def sparse_alpha(log_q_ids: Tensor, target: SparseTarget) -> Tensor:
    """Lower bound of alpha per row [N]: sum of min(p, q) over the logged tokens only."""
    return torch.minimum(target.probs.to(log_q_ids.dtype), log_q_ids.exp()).sum(-1)


def sparse_kl(log_q: Tensor, log_q_ids: Tensor, draft_ids: Tensor, target: SparseTarget,
              renormalise: bool = False) -> Tensor:
    """KL(p || q) per row [N] between the (k + 1)-bucket coarsenings: a lower bound of the true KL.
    renormalise=True for a truncated draft vocabulary (see the module docstring)."""
    inside = draft_ids >= 0  # [N, k]
    p = torch.where(inside, target.probs.to(log_q.dtype), 0.0)  # [N, k]
    r = target.residual.to(log_q.dtype).clamp_min(0)  # [N]
    if renormalise:
        mass = (p.sum(-1) + r).clamp_min(torch.finfo(p.dtype).tiny)  # [N]
        p, r = p / mass[:, None], r / mass

    # q_other: logsumexp over the draft tokens that were not logged; logged ones are pushed to <= LOG_ZERO.
    # (Out-of-vocabulary ids add 0 at column 0, a no-op.)
    push = torch.where(inside, LOG_ZERO, 0.0).to(log_q.dtype)  # [N, k]
    log_q_other = torch.logsumexp(log_q.scatter_add(1, draft_ids.clamp_min(0), push), dim=-1)  # [N]
    log_q_other = log_q_other.clamp_min(LOG_Q_MIN)

    kl_logged = torch.where(p > 0, p * (log_prob(p) - log_q_ids), 0.0).sum(-1)
    kl_other = torch.where(r > 0, r * (log_prob(r) - log_q_other), 0.0)
    return kl_logged + kl_other
