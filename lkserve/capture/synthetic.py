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
    hidden_dim: int = 0,
    hidden_dtype: str = "bf16",
    hidden_start: int = 0,
) -> VerificationRecord:
    """Shapes and dtypes exactly as the engine produces them; the values are noise that sums like probabilities.
    hidden_dim > 0 adds EAGLE-3 hidden states (N(0, 1) in `hidden_dtype`) for context positions hidden_start ..
    context_len - 2."""
    P = num_positions
    context_len = max(context_len, P + 1)
    logits = rng.standard_normal((P, k)).astype(np.float32) * 2
    probs = np.sort(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) * 0.95, axis=-1)[:, ::-1]
    record = VerificationRecord(
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
    if hidden_dim:
        from lkserve.capture.record import hidden_to_words

        rows = max(context_len - 1 - hidden_start, 0)
        record.hidden_states = hidden_to_words(rng.standard_normal((rows, hidden_dim)).astype(np.float32), hidden_dtype)
        record.hidden_start, record.hidden_dtype = hidden_start, hidden_dtype
    return record
