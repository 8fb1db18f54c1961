"""Per-draft-position bookkeeping: weights gamma^(n-1), means over the rows of each position, and LK-lambda.

Rows are flattened batch x sequence x draft position; `position` [N] (long, 0..K-1) says which draft position
(head / step of the draft block) each row belongs to. Position index 0 is the paper's n = 1.
"""

import torch
from torch import Tensor


def position_weights(num_positions: int, gamma: float = 0.8, device=None, dtype=torch.float32) -> Tensor:
    """[K] weights gamma^(n-1) for n = 1..K: a later draft only counts if every earlier one was accepted, so it
    matters less (EAGLE-3 and the LK paper use gamma = 0.8)."""
    return gamma ** torch.arange(num_positions, device=device, dtype=dtype)


def sum_and_count_per_position(values: Tensor, position: Tensor, num_positions: int) -> tuple[Tensor, Tensor]:
    """Sums [K] of values [N] over the rows of each draft position, and the row counts [K]."""
    sums = values.new_zeros(num_positions).index_add(0, position, values)
    counts = values.new_zeros(num_positions).index_add(0, position, torch.ones_like(values))
    return sums, counts


def mean_per_position(values: Tensor, position: Tensor, num_positions: int) -> Tensor:
    """Mean [K] of values [N] over the rows of each draft position; NaN for a position without rows."""
    sums, counts = sum_and_count_per_position(values, position, num_positions)
    return sums / counts


def weighted_position_loss(per_row: Tensor, position: Tensor, num_positions: int, gamma: float) -> Tensor:
    """sum_n gamma^(n-1) * (mean loss of the rows at draft position n), as EAGLE-3 sums its per-step losses.
    A position without rows adds 0."""
    sums, counts = sum_and_count_per_position(per_row, position, num_positions)
    weights = position_weights(num_positions, gamma, per_row.device, per_row.dtype)
    return (weights * sums / counts.clamp_min(1)).sum()


def lk_lambda(alpha_per_position: Tensor, eta: float = 3.0) -> Tensor:
    """lambda = exp(-eta * sg[alpha]) per draft position [K]: mostly KL while the draft is poor (alpha -> 0 gives
    lambda -> 1: KL has the useful gradient far from the target), mostly TV once it is good (alpha -> 1 gives
    lambda -> exp(-eta), e.g. 0.05 at eta = 3). alpha must already be averaged over batch and sequence."""
    return torch.exp(-eta * alpha_per_position.detach())
