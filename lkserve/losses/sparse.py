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


# ----------------------------------------------------------------------------------------------------------------
# Fused path: the same quantities straight from the logits, without materialising log_softmax
# ----------------------------------------------------------------------------------------------------------------
# The reference path above costs ~17 passes over the [N, V] logits (log_softmax, a scattered copy of log q, its
# logsumexp, and the autograd backward of each). The trainer's rows only need log q at the k logged ids and
# log q_other, so _LoggedLogQ computes them from z directly:
#
#     lse_m       = logsumexp over the unlogged draft tokens of z   (a copy of z with the logged ids at -inf)
#     lse         = logsumexp(lse_m, z[logged ids])                 (the full logsumexp from k + 1 terms)
#     log q(id_i) = z[id_i] - lse,   log q_other = lse_m - lse
#
# and writes the gradient in one pass: with s = sum_i g_i + g_other (g: the incoming gradients),
#     dz = pm * (g_other - s * q_other)  +  scatter(g_i - s * q(id_i))
# where pm = exp(z - lse_m) is the softmax over the unlogged tokens (0 at the logged ones). That is the gradient of
# the reference's log_softmax + gather + logsumexp written out; pm and q_other are each computed where they are
# accurate (pm <= 1 directly, never exp(z - lse) * exp(lse - lse_m)). Without the other bucket (LK-alpha, TV) the
# full softmax takes pm's place. tests/test_losses_fused.py checks values and gradients against the reference.


def _terms_forward(z: Tensor, cols: Tensor, inside: Tensor, with_other: bool):
    """(pm or softmax [N, V] for the backward, log q at the logged ids [N, k], log q_other [N] or lse [N])."""
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    z_ids = z.gather(1, cols)  # [N, k]
    if with_other:
        # the unlogged tokens: logged ones pushed to -inf (scatter_add: an out-of-vocabulary id's placeholder column 0
        # gets + 0, whatever order the scatter runs in)
        e = z.scatter_add(1, cols, torch.where(inside, neg_inf, 0.0).to(z.dtype))
    else:
        e = z.clone()
    mx = e.amax(-1, keepdim=True)  # [N, 1]
    mx = torch.where(torch.isfinite(mx), mx, 0.0)  # every token logged: lse_m = -inf, pm = 0
    e.sub_(mx).exp_()
    total = e.sum(-1, keepdim=True)  # [N, 1]
    lse_e = mx + total.log()  # [N, 1]: lse_m (with_other) or lse
    e.div_(torch.where(total > 0, total, 1.0))  # pm (with_other) or the full softmax
    if with_other:
        terms = torch.cat([lse_e, torch.where(inside, z_ids, neg_inf)], -1)  # [N, 1 + k]
        lse = torch.logsumexp(terms, -1, keepdim=True)  # [N, 1]
        second = (lse_e - lse)[:, 0]  # log q_other [N]
    else:
        lse = lse_e
        second = lse[:, 0]
    log_q_ids = torch.where(inside, z_ids - lse, LOG_ZERO)  # [N, k]
    return e, log_q_ids, second


def _terms_backward(e, cols, inside, log_q_ids, second, g_ids, g_other, with_other: bool) -> Tensor:
    """d loss / d z [N, V] from the incoming gradients of log q at the ids and of the second output."""
    g_ids = torch.zeros_like(log_q_ids) if g_ids is None else torch.where(inside, g_ids, 0.0)
    s = g_ids.sum(-1)  # [N]
    if with_other:
        g_o = torch.zeros_like(s) if g_other is None else g_other
        s = s + g_o
        coef = g_o - s * second.exp()  # pm's coefficient: g_other - s * q_other
        q_ids = torch.where(inside, log_q_ids.exp(), 0.0)  # [N, k]
        dz = e * coef[:, None]
        return dz.scatter_add_(1, cols, torch.where(inside, g_ids - s[:, None] * q_ids, 0.0))
    coef = -s if g_other is None else g_other - s  # g_other: the gradient of lse (unused by the losses; exact anyway)
    dz = e * coef[:, None]
    return dz.scatter_add_(1, cols, g_ids)  # the full softmax already holds the logged ids' q * coef


class _LoggedLogQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, cols: Tensor, inside: Tensor, with_other: bool):
        e, log_q_ids, second = _terms_forward(z, cols, inside, with_other)
        ctx.with_other = with_other
        ctx.save_for_backward(e, cols, inside, log_q_ids, second)
        return log_q_ids, second

    @staticmethod
    def backward(ctx, g_ids, g_other):
        e, cols, inside, log_q_ids, second = ctx.saved_tensors
        return _terms_backward(e, cols, inside, log_q_ids, second, g_ids, g_other, ctx.with_other), None, None, None


def _ids(target: SparseTarget, d2t: Tensor | None) -> tuple[Tensor, Tensor]:
    draft_ids = target.ids.long() if d2t is None else target_to_draft_ids(target.ids, d2t)
    return draft_ids, draft_ids >= 0


def fused_log_q(logits: Tensor, target: SparseTarget, d2t: Tensor | None = None,
                with_other: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log q of the logged tokens [N, k] (LOG_ZERO outside the draft vocabulary), their draft ids [N, k] (-1
    outside), log q_other [N] (before the LOG_Q_MIN clamp; None unless with_other)) straight from the draft
    logits [N, V_draft]: logged_log_q + sparse_kl's other bucket without the [N, V] log q (see above)."""
    draft_ids, inside = _ids(target, d2t)
    log_q_ids, other = _LoggedLogQ.apply(logits, draft_ids.clamp_min(0), inside, with_other)
    return log_q_ids, draft_ids, other if with_other else None


# ----------------------------------------------------------------------------------------------------------------
# The same from the head's inputs, a block of rows at a time
# ----------------------------------------------------------------------------------------------------------------
# A trainer's logits are hidden [N, H] @ W.T [H, V] (the LM head, no bias) / T. HeadRows hands the losses those
# instead of the [N, V] logits: fused_head_log_q then runs matmul + _terms_forward per block of BLOCK_ROWS rows, so
# the only [N, V] tensors are the saved softmax and, in the backward, dz in the matmul dtype (no full-size logits,
# fp32 copy of bf16 logits or autograd gradient chain). The backward computes dz per block, then d hidden = dz @ W and
# d W = dz.T @ hidden once over all rows. Equal to the unblocked path up to rounding. 512 rows: smaller blocks cost more in matmul efficiency than they win in
# cache (measured on this CPU at V = 8,192 and 49,152, fp32 and bf16: 64 rows +40%, 256 rows +4%, 512 rows = best).

BLOCK_ROWS = 512


class HeadRows(NamedTuple):
    """Draft logits given as the LM head's inputs: logits = (hidden @ weight.T) / divisor[:, None]."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [V, H] (nn.Linear without bias)
    divisor: Tensor | None = None  # [N] (the rows' temperatures), None: 1
    matmul_dtype: torch.dtype | None = None  # the matmuls' dtype (bf16 for the bf16 training precision); None: fp32

    def logits(self) -> Tensor:
        """The [N, V] logits themselves (the dense-target path), in the losses' float dtype."""
        out_dtype = torch.promote_types(self.hidden.dtype, torch.float32)
        mm = self.matmul_dtype or out_dtype
        z = (self.hidden.to(mm) @ self.weight.to(mm).T).to(out_dtype)
        return z if self.divisor is None else z / self.divisor.to(out_dtype)[:, None]

    def select(self, mask: Tensor) -> "HeadRows":
        return HeadRows(self.hidden[mask], self.weight, None if self.divisor is None else self.divisor[mask],
                        self.matmul_dtype)


class _HeadLoggedLogQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, divisor, cols, inside, with_other: bool, block: int, mm_dtype):
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        mm = mm_dtype or out_dtype
        w = weight.to(mm)
        es, ids, seconds = [], [], []
        for a in range(0, hidden.shape[0], block):
            z = (hidden[a: a + block].to(mm) @ w.T).to(out_dtype)
            if divisor is not None:
                z = z / divisor[a: a + block].to(out_dtype)[:, None]
            e, log_q_ids, second = _terms_forward(z, cols[a: a + block], inside[a: a + block], with_other)
            es.append(e)
            ids.append(log_q_ids)
            seconds.append(second)
        log_q_ids, second = torch.cat(ids), torch.cat(seconds)
        ctx.with_other, ctx.block, ctx.mm, ctx.es = with_other, block, mm, es
        ctx.save_for_backward(hidden, weight, divisor, cols, inside, log_q_ids, second)
        return log_q_ids, second

    @staticmethod
    def backward(ctx, g_ids, g_other):
        hidden, weight, divisor, cols, inside, log_q_ids, second = ctx.saved_tensors
        block, mm, es = ctx.block, ctx.mm, ctx.es
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # dz block by block (the elementwise part), written into one [N, V] buffer in the matmul dtype; then the two
        # matmuls once over all rows (one cast of d W, full-size matmuls)
        dz_all = torch.empty(hidden.shape[0], weight.shape[0], dtype=mm, device=hidden.device)
        for i, a in enumerate(range(0, hidden.shape[0], block)):
            sl = slice(a, a + block)
            dz = _terms_backward(es[i], cols[sl], inside[sl], log_q_ids[sl], second[sl],
                                 None if g_ids is None else g_ids[sl], None if g_other is None else g_other[sl],
                                 ctx.with_other)
            es[i] = None  # free the block's softmax as soon as it is used
            if divisor is not None:
                dz = dz / divisor[sl].to(dz.dtype)[:, None]
            dz_all[sl] = dz
        ctx.es = None
        g_hidden = (dz_all @ weight.to(mm)).to(hidden.dtype) if need_h else None
        g_weight = (dz_all.T @ hidden.to(mm)).to(weight.dtype) if need_w else None
        return g_hidden, g_weight, None, None, None, None, None, None


def fused_head_log_q(rows: HeadRows, target: SparseTarget, d2t: Tensor | None = None, with_other: bool = True,
                     block_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """fused_log_q of the logits `rows` stands for, computed a block of rows at a time (see above)."""
    draft_ids, inside = _ids(target, d2t)
    block = max(1, block_rows or BLOCK_ROWS)
    divisor = None if rows.divisor is None else rows.divisor.detach()
    log_q_ids, other = _HeadLoggedLogQ.apply(rows.hidden, rows.weight, divisor, draft_ids.clamp_min(0), inside,
                                             with_other, block, rows.matmul_dtype)
    return log_q_ids, draft_ids, other if with_other else None


def sparse_kl_from(log_q_ids: Tensor, log_q_other: Tensor, draft_ids: Tensor, target: SparseTarget,
                   renormalise: bool = False) -> Tensor:
    """sparse_kl from log q at the logged ids and log q_other (fused_log_q): the same KL, term for term."""
    inside = draft_ids >= 0
    p = torch.where(inside, target.probs.to(log_q_ids.dtype), 0.0)
    r = target.residual.to(log_q_ids.dtype).clamp_min(0)
    if renormalise:
        mass = (p.sum(-1) + r).clamp_min(torch.finfo(p.dtype).tiny)
        p, r = p / mass[:, None], r / mass
    log_q_other = log_q_other.clamp_min(LOG_Q_MIN)
    kl_logged = torch.where(p > 0, p * (log_prob(p) - log_q_ids), 0.0).sum(-1)
    kl_other = torch.where(r > 0, r * (log_prob(r) - log_q_other), 0.0)
    return kl_logged + kl_other
