"""Two fixes that keep vLLM 0.32's probabilistic verification exact and at Σmin(p, q) acceptance when a request's
drafts are not from the last proposal (docs/engine.md, "Draft probabilities across skipped steps").

1. `apply_placeholder_fix`: the scheduler pads a request that has no drafts yet (exactly one prompt token left to
   prefill: a prefix-cache hit of all but the last token, a resumed request) with K placeholder drafts of -1. The
   Triton rejection kernel rejects negative drafts; vLLM's CPU C++ kernel does not check them, reads p and q at
   index -1 (the previous row's last entry) and accepts placeholders: tokens that were never sampled from p.
   Clamp them to id 0 with a uniform of +inf, a certain rejection, so the position emits the recovered token ~ p.
2. `install_placeholder_rows`: the runner keeps the draft probabilities of the last proposal only, so a request
   holding placeholders makes `_get_spec_decode_draft_probs` return None for the whole batch, and vLLM then
   verifies every request against a point-mass q (exact, but acceptance falls from Σmin(p, q) to Σp·q). Give
   placeholder rows q = 0 and keep the other requests' rows.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger("lkserve.engine")

_lock = threading.Lock()
placeholder_state: dict[str, Any] = {"applied": False, "reason": "not attempted", "placeholder_rows": 0}


def apply_placeholder_fix() -> dict[str, Any]:
    """Wrap `rejection_sampler._rejection_random_sample` (looked up at call time by `rejection_sample`). Must run
    after the platform registered its kernel overrides (worker init), i.e. from the worker extension."""
    with _lock:
        if placeholder_state["applied"]:
            return dict(placeholder_state)
        if os.environ.get("LKSERVE_DISABLE_PLACEHOLDER_FIX", "0") == "1":
            placeholder_state["reason"] = "disabled by LKSERVE_DISABLE_PLACEHOLDER_FIX=1"
            return dict(placeholder_state)
        try:
            from vllm.triton_utils import HAS_TRITON
            from vllm.v1.sample import rejection_sampler as rs

            if HAS_TRITON:
                placeholder_state["reason"] = "Triton kernel rejects negative drafts itself"
                return dict(placeholder_state)
            rs._rejection_random_sample = _wrap_random_sample(rs._rejection_random_sample)
            placeholder_state.update(applied=True, reason="negative drafts are certain rejections (CPU kernel)")
        except Exception as e:  # noqa: BLE001
            placeholder_state["reason"] = f"error: {e!r}"
            logger.warning("lkserve: placeholder fix not applied: %r", e)
        return dict(placeholder_state)


def _wrap_random_sample(original):
    if getattr(original, "_lkserve_fix", False):
        return original

    def _rejection_random_sample(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs,
                                 bonus_token_ids, recovered_token_ids, uniform_probs, *args, **kwargs):
        pad = draft_token_ids < 0  # [num_tokens]
        n = int(pad.sum())
        if n:
            placeholder_state["placeholder_rows"] += n
            draft_token_ids = draft_token_ids.masked_fill(pad, 0)
            uniform_probs = uniform_probs.masked_fill(pad, float("inf"))  # p/q >= inf never holds
        return original(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs,
                        bonus_token_ids, recovered_token_ids, uniform_probs, *args, **kwargs)

    _rejection_random_sample._lkserve_fix = True  # type: ignore[attr-defined]
    _rejection_random_sample._lkserve_original = original  # type: ignore[attr-defined]
    _rejection_random_sample.register_warmup = getattr(original, "register_warmup", None)  # type: ignore[attr-defined]
    return _rejection_random_sample


def install_placeholder_rows(runner) -> dict[str, Any]:
    """Wrap the runner's `_get_spec_decode_draft_probs` so placeholder requests get zero q rows instead of costing
    the whole batch its draft probabilities. Counters in `runner._lkserve_draft_probs`."""
    stats = getattr(runner, "_lkserve_draft_probs", None)
    if stats is not None:
        return stats
    stats = {"applied": False, "reason": "", "misses": 0, "placeholders": 0}
    runner._lkserve_draft_probs = stats
    if os.environ.get("LKSERVE_DISABLE_DRAFT_PROBS_FIX", "0") == "1":
        stats["reason"] = "disabled by LKSERVE_DISABLE_DRAFT_PROBS_FIX=1"
        return stats
    orig_get = runner._get_spec_decode_draft_probs

    def _get_spec_decode_draft_probs(spec_decode_metadata):
        return _assemble(runner, stats, spec_decode_metadata, orig_get)

    runner._get_spec_decode_draft_probs = _get_spec_decode_draft_probs
    stats.update(applied=True, reason="placeholder requests get zero draft-probability rows")
    return stats


def _assemble(runner, stats, md, orig_get):
    """[num_draft_tokens_total, V] draft probabilities in batch order, or vLLM's own answer (None: point-mass q for
    the whole batch) when a request with real drafts is not in the last proposal (counted as a miss)."""
    import torch

    probs, ids = runner._draft_probs, runner._draft_prob_req_ids
    row_of = {rid: i for i, rid in enumerate(ids)} if probs is not None and ids is not None else {}
    rows, start, draft_ids = [], 0, None  # a [n, V] tensor, or n for n placeholder rows
    for rid, n in zip(runner.input_batch.req_ids, md.num_draft_tokens):
        if n == 0:
            continue
        if rid in row_of:
            rows.append(probs[row_of[rid], :n])
        else:
            if draft_ids is None:
                draft_ids = md.draft_token_ids.cpu()
            if not bool((draft_ids[start:start + n] < 0).all()):
                stats["misses"] += 1
                return orig_get(md)
            rows.append(n)  # placeholders: q = 0, so the recovered token is sampled from p itself
            stats["placeholders"] += 1
        start += n
    real = [r for r in rows if not isinstance(r, int)]
    if not real:  # nothing but placeholders: no q is needed, the placeholder fix rejects them all
        return None
    v = real[0].shape[-1]
    return torch.cat([real[0].new_zeros(r, v) if isinstance(r, int) else r for r in rows]).contiguous()
