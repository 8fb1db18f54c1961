"""Real capture records for the trainer's tests, from the tiny target run with transformers (no engine).

Prompts are windows of tokenized stdlib text; continuations are sampled from the target at temperature T; at every
generated position the record keeps the target's distribution (softmax(logits / T)) as top-k, exactly what the
engine logs. draft_index cycles 0..K-1 as in K-token draft blocks. `shuffled` breaks the target/position pairing
(a stream whose labels are garbage) for the gate's refusal test.
"""

from __future__ import annotations

import numpy as np
import torch

from lkserve.capture.record import VerificationRecord

_CORPUS_IDS: dict = {}


def _prompt_windows(tokenizer, n: int, length: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    from lkserve.models.tiny import _corpus_text

    if "ids" not in _CORPUS_IDS:
        _CORPUS_IDS["ids"] = np.asarray(tokenizer(_corpus_text(100_000))["input_ids"], dtype=np.int64)
    ids = _CORPUS_IDS["ids"]
    starts = rng.integers(0, len(ids) - length - 1, n)
    return np.stack([ids[s : s + length] for s in starts])


@torch.no_grad()
def make_records(target_dir, n_requests: int = 64, seed: int = 0, temperature: float = 1.0, K: int = 4,
                 k: int = 32, prompt_len: int = 16, gen_len: int = 48, draft_version: str = "base",
                 tags: dict | None = None, prefix: str = "req") -> list[VerificationRecord]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    V = model.config.vocab_size
    k = min(k, V)
    prompts = torch.from_numpy(_prompt_windows(tok, n_requests, prompt_len, rng))
    gen = torch.Generator().manual_seed(seed)
    seq = prompts.clone()
    past, step_in = None, seq
    for _ in range(gen_len):  # plain ancestral sampling, so the records do not depend on generate()'s defaults
        out = model(input_ids=step_in, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        p = torch.softmax(logits / temperature, -1) if temperature > 1e-5 else torch.nn.functional.one_hot(
            logits.argmax(-1), V).float()
        nxt = torch.multinomial(p, 1, generator=gen)
        seq = torch.cat([seq, nxt], 1)
        step_in = nxt
    logits = model(input_ids=seq).logits.float()  # [B, C, V]: row t predicts token t + 1
    records = []
    for b in range(n_requests):
        positions = np.arange(prompt_len, prompt_len + gen_len, dtype=np.uint32)
        lg = logits[b, positions.astype(np.int64) - 1]
        p = torch.softmax(lg / temperature, -1) if temperature > 1e-5 else torch.nn.functional.one_hot(
            lg.argmax(-1), V).float()
        probs, ids = p.topk(k, -1)
        P = len(positions)
        records.append(VerificationRecord(
            request_id=f"{prefix}-{seed}-{b}",
            model_id="tiny-target",
            draft_version=draft_version,
            temperature=float(temperature),
            context_token_ids=seq[b].numpy().astype(np.uint32),
            positions=positions,
            draft_index=(np.arange(P) % K).astype(np.uint8),
            draft_token_ids=seq[b, positions.astype(np.int64)].numpy().astype(np.uint32),
            accepted=rng.random(P) < 0.5,
            topk_ids=ids.numpy().astype(np.uint32),
            topk_probs=probs.numpy().astype(np.float16),
            residual=(1 - probs.sum(-1)).clamp_min(0).numpy().astype(np.float16),
            draft_probs=np.full(P, np.nan, dtype=np.float16),
            tags=dict(tags or {}),
        ))
    return records


def shuffled(records: list[VerificationRecord], seed: int = 0, vocab_size: int = 512) -> list[VerificationRecord]:
    """Garbage labels: every logged target token id is replaced through a random permutation of the vocabulary
    (same contexts, positions and probabilities; the target's distribution is scrambled)."""
    import dataclasses

    perm = np.random.default_rng(seed).permutation(vocab_size).astype(np.uint32)
    return [dataclasses.replace(r, request_id=r.request_id + "-shuf", topk_ids=perm[r.topk_ids]) for r in records]


def test_records_are_consistent(tiny):
    recs = make_records(tiny.target, n_requests=4, gen_len=8)
    for r in recs:
        assert r.topk_ids.shape == (8, 32)
        assert np.all(r.topk_probs.astype(np.float32).sum(-1) + r.residual.astype(np.float32) > 0.99)
        assert r.positions.max() < len(r.context_token_ids)
