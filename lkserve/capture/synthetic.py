"""Plausible random verification records, for tests and benchmarks of the capture path (no model needed)."""

from __future__ import annotations

import numpy as np

from lkserve.capture.record import VerificationRecord

SMOLLM2_VOCAB = 49_152


def random_record(
    rng: np.random.Generator,
    num_positions: int = 16,
    k: int = 32,
    context_len: int = 512,
    vocab_size: int = SMOLLM2_VOCAB,
    num_speculative_tokens: int = 4,
    request_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> VerificationRecord:
    """Shapes and dtypes exactly as the engine produces them; the values are noise that sums like probabilities."""
    P = num_positions
    context_len = max(context_len, P + 1)
    logits = rng.standard_normal((P, k)).astype(np.float32) * 2
    probs = np.sort(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) * 0.95, axis=-1)[:, ::-1]
    return VerificationRecord(
        request_id=request_id or f"req-{rng.integers(1 << 62):x}",
        model_id="HuggingFaceTB/SmolLM2-360M-Instruct",
        draft_version="draft-0001",
        temperature=0.7,
        context_token_ids=rng.integers(0, vocab_size, context_len, dtype=np.uint32),
        positions=np.sort(rng.choice(np.arange(1, context_len, dtype=np.uint32), P, replace=False)),
        draft_index=(np.arange(P) % num_speculative_tokens).astype(np.uint8),
        draft_token_ids=rng.integers(0, vocab_size, P, dtype=np.uint32),
        accepted=rng.random(P) < 0.7,
        topk_ids=np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(P)]).astype(np.uint32)
        if P
        else np.zeros((0, k), np.uint32),
        topk_probs=probs.astype(np.float16),
        residual=(1 - probs.sum(-1)).astype(np.float16),
        draft_probs=rng.random(P).astype(np.float16),
        top_p=0.95,
        tags=dict(tags or {}),
    )
