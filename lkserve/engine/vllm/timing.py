"""Opt-in timing of the parts of an engine step, for bench/step_cost.py: where a speculative step's time goes.

Enabled by LKSERVE_STEP_TIMING=1 in the engine-core process's environment (read once, when the worker extension
initialises). Off by default, and then nothing is wrapped: no cost at all. On, it wraps these runner methods
(`GPUModelRunner`, vLLM 0.32) with wall-clock accumulators:

    target_forward   runner._model_forward              the target's forward over the scheduled tokens (verification)
    target_logits    runner.model.compute_logits        the target's LM head on the sampled / verified rows
    sampling         runner._sample                     sampler, or draft probabilities + rejection sampler
    drafting         runner.propose_draft_token_ids     the K draft passes and their input preparation
    draft_forward    runner.drafter.model.forward       each draft model / EAGLE-3 head forward (one per pass)
    draft_logits     runner.drafter.model.compute_logits  the draft's LM head, once per pass
    execute_model    runner.execute_model               the whole first half of a worker step (outermost wrapper)
    sample_tokens    runner.sample_tokens               the second half (sampling, drafting, bookkeeping)

The inner ones (the first six) are installed BEFORE the capture hooks, the last two AFTER them, so capture's own
work (its `hook_seconds`) lies inside execute_model/sample_tokens but outside every inner part. `between_steps` is
the engine core's time outside the worker while it serves: from the end of one worker call to the start of the next
(scheduler, output serialisation to the AsyncLLM process, its busy loop); gaps longer than IDLE_GAP_S are idle time, counted apart.
Read with `lkserve_info()["step_timing"]` (cumulative; a caller takes differences).
"""

from __future__ import annotations

import os
import time
from typing import Any

ENV = "LKSERVE_STEP_TIMING"
IDLE_GAP_S = 0.25  # a pause between two worker steps longer than this is no request, not scheduler work


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


class StepTimer:
    """Accumulated wall seconds and calls per part, plus the gaps between worker steps."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.last_end: float | None = None
        self.idle_gaps = 0

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.calls[part] = self.calls.get(part, 0) + 1

    def wrap(self, part: str, fn, step_edge: bool = False):
        """`fn` timed as `part`. step_edge: a worker-step half (execute_model / sample_tokens), whose start closes
        the gap since the previous half ended (engine-core time outside the worker)."""
        if getattr(fn, "_lkserve_timed", None) == part:
            return fn

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            if step_edge and self.last_end is not None:
                gap = t0 - self.last_end
                if gap < IDLE_GAP_S:
                    self.add("between_steps", gap)
                else:
                    self.idle_gaps += 1
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                self.add(part, t1 - t0)
                if step_edge:
                    self.last_end = t1

        timed._lkserve_timed = part  # type: ignore[attr-defined]
        timed._lkserve_original = fn  # type: ignore[attr-defined]
        return timed

    def snapshot(self) -> dict[str, Any]:
        import torch

        return {"seconds": dict(self.seconds), "calls": dict(self.calls), "idle_gaps": self.idle_gaps,
                "pid": os.getpid(), "torch_threads": torch.get_num_threads()}


def install_inner(runner) -> StepTimer | None:
    """Wrap the parts (before the capture hooks); None, and nothing wrapped, unless LKSERVE_STEP_TIMING=1."""
    if not enabled():
        return None
    timer = getattr(runner, "_lkserve_step_timer", None)
    if timer is not None:
        return timer
    timer = StepTimer()
    runner._lkserve_step_timer = timer
    runner._model_forward = timer.wrap("target_forward", runner._model_forward)
    runner._sample = timer.wrap("sampling", runner._sample)
    runner.propose_draft_token_ids = timer.wrap("drafting", runner.propose_draft_token_ids)
    model = runner.model
    model.compute_logits = timer.wrap("target_logits", model.compute_logits)
    draft = getattr(getattr(runner, "drafter", None), "model", None)
    if draft is not None and hasattr(draft, "forward"):  # ngram has no model
        draft.forward = timer.wrap("draft_forward", draft.forward)
        if hasattr(draft, "compute_logits"):
            draft.compute_logits = timer.wrap("draft_logits", draft.compute_logits)
    return timer


def install_outer(runner) -> None:
    """Wrap the two halves of a worker step (after the capture hooks, so their time includes capture's)."""
    timer = getattr(runner, "_lkserve_step_timer", None)
    if timer is None:
        return
    runner.execute_model = timer.wrap("execute_model", runner.execute_model, step_edge=True)
    runner.sample_tokens = timer.wrap("sample_tokens", runner.sample_tokens, step_edge=True)


def snapshot(runner) -> dict[str, Any] | None:
    timer = getattr(runner, "_lkserve_step_timer", None)
    return timer.snapshot() if timer is not None else None
