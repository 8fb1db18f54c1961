"""What the engine captures at each verification step: the contract between engine, capture and trainer.

One record covers one request (or one chunk of a long request). For every *verified* drafted position — the
rejection sampler looked at it: all draft tokens up to and including the first rejected one — it keeps the target's
distribution as the sampler saw it (after temperature / top-p / top-k), reduced to its top-k tokens. Positions after
the first rejection are not kept: the target scored them after a prefix that never became part of the text.

`context_token_ids` is the prompt plus every token emitted up to the record's last position, so a trainer can rebuild
the draft's input without re-running the target: the target distribution at `positions[i]` predicts
`context_token_ids[positions[i]]` from `context_token_ids[:positions[i]]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

RECORD_FORMAT_VERSION = 1


@dataclass
class VerificationRecord:
    request_id: str
    model_id: str
    draft_version: str
    temperature: float
    context_token_ids: np.ndarray  # [C] uint32: prompt + emitted tokens
    positions: np.ndarray  # [P] uint32: index in context of the drafted token
    draft_index: np.ndarray  # [P] uint8: 0..K-1, place of the token inside its draft block
    draft_token_ids: np.ndarray  # [P] uint32: what the draft proposed
    accepted: np.ndarray  # [P] bool
    topk_ids: np.ndarray  # [P, k] uint32: target's top-k token ids at that position
    topk_probs: np.ndarray  # [P, k] float16: their probabilities (after temperature/top-p/top-k)
    residual: np.ndarray  # [P] float16: 1 - sum(topk_probs), mass the record does not name
    draft_probs: np.ndarray  # [P] float16: q(draft token); NaN when the draft's distribution was not kept
    top_p: float = 1.0
    top_k: int = -1  # the request's sampling top-k (-1 = off), not the capture's k
    timestamp: float = field(default_factory=time.time)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. {"domain": "code", "tenant": "acme"}

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])
