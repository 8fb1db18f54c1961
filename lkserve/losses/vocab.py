"""Truncated draft vocabularies: the draft-to-target id map `d2t`.

Everywhere in `lkserve.losses`, `d2t` is the PLAIN id map: `d2t[i]` = target-vocabulary id of draft token i, a
LongTensor [V_draft] with distinct entries. EAGLE-3 checkpoints in the speculators format store it as an OFFSET,
`d2t[i] = target_id - i`; convert those with `d2t_from_offsets` before use.
"""

import torch
from torch import Tensor


def d2t_from_offsets(offsets: Tensor) -> Tensor:
    """EAGLE-3 / speculators offsets (target_id - draft_id) -> plain id map."""
    return offsets.long() + torch.arange(len(offsets), device=offsets.device)


def d2t_to_offsets(d2t: Tensor) -> Tensor:
    """Plain id map -> EAGLE-3 / speculators offsets (target_id - draft_id)."""
    return d2t.long() - torch.arange(len(d2t), device=d2t.device)


def target_to_draft_ids(target_ids: Tensor, d2t: Tensor) -> Tensor:
    """Map target ids (any shape) to draft ids; -1 where the target token is not in the draft vocabulary."""
    d2t = d2t.long()
    t2d = torch.full((int(d2t.max()) + 1,), -1, dtype=torch.long, device=d2t.device)  # [max target id + 1]
    t2d[d2t] = torch.arange(len(d2t), device=d2t.device)
    target_ids = target_ids.long()
    known = (target_ids >= 0) & (target_ids < len(t2d))
    return torch.where(known, t2d[target_ids.clamp(0, len(t2d) - 1)], -1)
