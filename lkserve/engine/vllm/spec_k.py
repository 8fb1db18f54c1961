"""Drafting fewer than the configured K on a running engine (vLLM 0.32).

vLLM's runner already drafts a per-step K: `GPUModelRunner.propose_draft_token_ids` reads
`scheduler_output.num_spec_tokens_to_schedule` and passes it to `drafter.propose(num_speculative_tokens=...)`
(gpu_model_runner.py:4763, :5007), which sets `self.num_speculative_tokens` from it on every call and runs that many
draft passes (llm_base_proposer.py:532, :689); buffers stay sized for the configured K (the maximum). The scheduler
sets it to the configured K unless vLLM's batch-size "Dynamic SD" schedule is on (scheduler.py:1486), schedules
whatever drafts come back (scheduler.py:869) and counts the drafts a step really verified (scheduler.py:2116); the
runner follows the width of the last proposal (`prev_num_spec_tokens`, gpu_model_runner.py:4638). So a cap applied
where the runner reads it lowers K from the next step on, in the worker, in either layout.

What stays at the configured K: the scheduler's token budget and KV lookahead (a few slots over-allocated), and the
placeholder drafts it pads a request with one prompt token left to prefill (scheduler.py:1372: K x -1, rejected
by lkserve's placeholder fix). On GPU, uniform-decode CUDA graphs are captured for 1 + K query tokens: a smaller K
would fall back to another graph mode (not tried; lkserve runs eager on CPU).
"""

from __future__ import annotations

import collections
import copy
import time

STEP_WINDOW = 2048  # recent decode-only steps kept per (K, batch size): about a minute of serving at one K
IDLE_GAP_S = 0.25  # a longer gap between two step starts is a pause in traffic, not a step


def install_k_limit(runner) -> None:
    """Wrap `runner.propose_draft_token_ids` so each step drafts min(scheduled K, runner._lkserve_k_limit)."""
    if getattr(runner, "_lkserve_k_wrapped", False):
        return
    runner._lkserve_k_limit = None
    orig = runner.propose_draft_token_ids

    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        limit = runner._lkserve_k_limit
        if limit is not None and scheduler_output.num_spec_tokens_to_schedule > limit:
            # a shallow copy: the scheduler's own SchedulerOutput keeps its fields
            scheduler_output = copy.copy(scheduler_output)
            scheduler_output.num_spec_tokens_to_schedule = limit
        return orig(scheduler_output, *args, **kwargs)

    runner.propose_draft_token_ids = propose_draft_token_ids
    runner._lkserve_k_wrapped = True


def k_max(runner) -> int:
    spec = getattr(runner, "speculative_config", None)
    return int(spec.num_speculative_tokens) if spec is not None else 0


def set_k_limit(runner, k: int | None) -> dict:
    """Draft at most k tokens per step from the next step on (None: the configured K). 1 <= k <= configured K."""
    kmax = k_max(runner)
    if kmax == 0 or not getattr(runner, "_lkserve_k_wrapped", False):
        return {"ok": False, "reason": "this engine does not speculate", "k": None, "k_max": kmax}
    if k is not None and not 1 <= int(k) <= kmax:
        return {"ok": False, "reason": f"K must be in 1..{kmax}", "k": k_info(runner)["k"], "k_max": kmax}
    runner._lkserve_k_limit = None if k is None or int(k) == kmax else int(k)
    return {"ok": True, "reason": "ok", **k_info(runner)}


def k_info(runner) -> dict:
    kmax = k_max(runner)
    limit = getattr(runner, "_lkserve_k_limit", None)
    return {"k": limit if limit is not None else (kmax or None), "k_max": kmax}


def _decode_batch(scheduler_output) -> int:
    """Requests in a decode-only step (each scheduled for 1 + its drafts tokens); 0 for a step with any prefill."""
    counts = scheduler_output.num_scheduled_tokens
    drafts = scheduler_output.scheduled_spec_decode_tokens or {}
    if not counts:
        return 0
    for rid, n in counts.items():
        if n != 1 + len(drafts.get(rid, ())):
            return 0
    return len(counts)


def install_step_clock(runner) -> None:
    """Wrap `runner.execute_model` (outermost) to time every decode-only step from its start to the next step's
    start, under (K, requests in the batch): what the K policy needs as cost(K) on this machine, now, including
    the scheduler's and the engine core's share. A step is counted only when it and the step before it drafted
    under the same K limit (the first step after a change verifies the old K's drafts)."""
    if getattr(runner, "_lkserve_step_clock", None) is not None:
        return
    clock = {"k": None, "prev": None, "steps": {}}  # prev: (k, batch, start, pure); steps: {(k, b): deque}
    runner._lkserve_step_clock = clock
    orig = runner.execute_model

    def execute_model(scheduler_output, *args, **kwargs):
        t = time.perf_counter()
        k = k_info(runner)["k"]
        fresh = k != clock["k"]
        clock["k"] = k
        prev = clock["prev"]
        if prev is not None and prev[3] and prev[0] == k and t - prev[2] < IDLE_GAP_S:
            window = clock["steps"].setdefault((k, prev[1]), collections.deque(maxlen=STEP_WINDOW))
            window.append((t, t - prev[2]))
        b = _decode_batch(scheduler_output)
        clock["prev"] = (k, b, t, not fresh) if b else None
        return orig(scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model


def reset_step_costs(runner) -> None:
    """Forget every timed step (a benchmark arm that must start cold)."""
    clock = getattr(runner, "_lkserve_step_clock", None)
    if clock is not None:
        clock["steps"].clear()
        clock["prev"] = None


def step_costs(runner, max_age_s: float | None = None) -> list[dict]:
    """Seconds per decode-only step under each (K, batch size), over the steps of the last max_age_s seconds (None:
    every kept step): their mean, and each step as [age_s, seconds] so that the K policy can compare two Ks on
    steps that ran close together in time (spec_k.cost_from_steps), not on means taken under different loads."""
    clock = getattr(runner, "_lkserve_step_clock", None)
    if clock is None:
        return []
    now = time.perf_counter()
    out = []
    for (k, b), window in list(clock["steps"].items()):
        kept = [(now - t, s) for t, s in list(window) if max_age_s is None or now - t <= max_age_s]
        if kept:
            out.append({"k": k, "batch": b, "steps": len(kept), "mean_s": sum(s for _, s in kept) / len(kept),
                        "samples": [[round(a, 4), s] for a, s in kept]})
    return sorted(out, key=lambda r: (r["batch"], r["k"]))
