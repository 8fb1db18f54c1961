"""LK losses (arXiv 2602.23881): train the draft on the acceptance rate alpha = sum min(p, q) itself.

    from lkserve.losses import lk_lambda_loss
    out = lk_lambda_loss(draft_logits, target_probs, draft_position, mask)   # or a SparseTarget
    out.loss.backward(); log(out.alpha_per_position, out.lambda_per_position)

See docs/losses.md for the definitions, the sparse bounds and the truncated-vocabulary rule.
"""

from .core import LossOutput, kl_loss, lk_alpha_loss, lk_lambda_loss, per_row_terms, tv_loss
from .dense import acceptance
from .sparse import HeadRows, SparseTarget, topk_target
from .vocab import d2t_from_offsets, d2t_to_offsets, target_to_draft_ids
from .weights import lk_lambda, mean_per_position, position_weights

__all__ = [
    "HeadRows",
    "LossOutput",
    "SparseTarget",
    "acceptance",
    "d2t_from_offsets",
    "d2t_to_offsets",
    "kl_loss",
    "lk_alpha_loss",
    "lk_lambda",
    "lk_lambda_loss",
    "mean_per_position",
    "per_row_terms",
    "position_weights",
    "target_to_draft_ids",
    "topk_target",
    "tv_loss",
]
