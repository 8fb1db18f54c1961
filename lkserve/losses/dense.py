"""Per-row terms for DENSE targets: target probabilities p [N, V] against the draft's q [N, V]."""

import torch
from torch import Tensor

ALPHA_EPS = 1e-38  # ~fp32's smallest normal: alpha is clamped to this inside log, so LK-alpha <= 87.5
LOG_ZERO = -1e4  # stand-in for log 0 where a finite value is needed: exp(LOG_ZERO) == 0 in fp32 and fp64


def acceptance(p: Tensor, q: Tensor) -> Tensor:
    """alpha = sum_x min(p(x), q(x)) over the last dim: the probability that a token drafted from q is accepted
    by the target p (= 1 - TV(p, q)). p, q: probabilities [..., V] -> [...]."""
    return torch.minimum(p, q).sum(-1)


def log_prob(p: Tensor) -> Tensor:
    """log p with log 0 = LOG_ZERO (and tiny negative round-off treated as 0)."""
    return p.clamp_min(0).log().clamp_min(LOG_ZERO)


def target_on_draft_vocab(p: Tensor, d2t: Tensor | None) -> Tensor:
    """Target probabilities of the draft's tokens [N, V_target] -> [N, V_draft], NOT renormalised: the target mass
    outside the draft vocabulary is mass the draft can never propose, so it contributes min(p, 0) = 0 to alpha."""
    return p if d2t is None else p[:, d2t]


def dense_kl(log_q: Tensor, p: Tensor, renormalise: bool = False) -> Tensor:
    """Forward KL(p || q) per row [N], with 0 * log 0 = 0. log_q: [N, V] from log_softmax (finite logits).

    renormalise=True (truncated draft vocabulary): q lives on the draft vocabulary only, so KL is only finite
    against p renormalised over that vocabulary, a "proxy of a proxy". The LK/TV terms never renormalise.
    """
    if renormalise:
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    with torch.no_grad():  # sum p log p: constant w.r.t. the draft, so no graph (cheaper than F.kl_div)
        neg_entropy = torch.xlogy(p, p).sum(-1)  # [N]
    return neg_entropy - (p * log_q).sum(-1)
