"""The hooks inside vLLM's model runner: they translate each verification step (and, for EAGLE-3, each target
forward) into the plain dataclasses of `lkserve.capture.accumulator` and hand them to the worker's CaptureState."""

from __future__ import annotations

import functools
import logging
import threading
import time

from lkserve.capture.accumulator import CaptureState, HiddenStep, RequestInfo, VerifyStep

logger = logging.getLogger("lkserve.engine")

EXTRA_ARGS_KEY = "lkserve"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"capture": bool, "tags": {}, "rid": str}

_tls = threading.local()


def install_rejection_sample_hook() -> None:
    """Wrap `rejection_sampler.rejection_sample` so the capture sees the processed target logits (and the draft
    probabilities) exactly as the sampler used them."""
    from vllm.v1.sample import rejection_sampler as rs

    if getattr(rs.rejection_sample, "_lkserve_hook", False):
        return
    original = rs.rejection_sample

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                         target_logits, *args, **kwargs):
        slot = getattr(_tls, "slot", None)
        if slot is not None:
            slot["target_logits"] = target_logits
            slot["draft_probs"] = draft_probs
        return original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                        target_logits, *args, **kwargs)

    rejection_sample._lkserve_hook = True  # type: ignore[attr-defined]
    rejection_sample._lkserve_original = original  # type: ignore[attr-defined]
    rs.rejection_sample = rejection_sample


def external_id(req_id: str, extra: dict) -> str:
    """The caller's request id: the one lkserve put in extra_args, else vLLM's internal id without its suffix."""
    rid = extra.get("rid")
    if rid:
        return str(rid)
    if len(req_id) > 9 and req_id[-9] == "-":  # AsyncLLM appends "-<8 hex>" to make internal ids unique
        return req_id[:-9]
    return req_id


def request_info(runner, req_id: str) -> RequestInfo | None:
    """A request of the runner (`CachedRequestState`) as capture sees it; None once vLLM dropped it."""
    state = runner.requests.get(req_id)
    if state is None:
        return None
    sp = state.sampling_params
    extra = (getattr(sp, "extra_args", None) or {}).get(EXTRA_ARGS_KEY) or {}
    top_k = int(getattr(sp, "top_k", 0) or 0)
    return RequestInfo(
        request_id=external_id(req_id, extra),
        prompt_token_ids=state.prompt_token_ids,
        output_token_ids=state.output_token_ids,
        temperature=float(getattr(sp, "temperature", 1.0) or 0.0),
        top_p=float(getattr(sp, "top_p", 1.0) or 1.0),
        top_k=top_k if top_k > 0 else -1,
        capture=bool(extra.get("capture", True)),
        tags={str(k): str(v) for k, v in (extra.get("tags") or {}).items()},
    )


def on_verify(cap: CaptureState, runner, md, sampler_output, slot: dict, logits) -> None:
    """After `GPUModelRunner._sample` with drafts: one VerifyStep for the capture."""
    lookup = functools.partial(request_info, runner)
    req_ids = runner.input_batch.req_ids
    if not any(n and cap.acc_for(req_ids[i], lookup) is not None for i, n in enumerate(md.num_draft_tokens)):
        return
    target_logits = slot["target_logits"]
    if target_logits is None:  # the sampler hook did not fire: recompute the way the rejection sampler does
        import torch
        from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

        target_logits = apply_sampling_constraints(
            logits[md.target_logits_indices].to(torch.float32).clone(), md.cu_num_draft_tokens,
            runner.input_batch.sampling_metadata)
    cap.on_step(VerifyStep(req_ids=req_ids, num_draft_tokens=md.num_draft_tokens,
                           sampled_token_ids=sampler_output.sampled_token_ids.cpu().numpy(),
                           draft_token_ids=md.draft_token_ids, target_logits=target_logits,
                           draft_probs=slot["draft_probs"], fallback_logits=slot["target_logits"] is None), lookup)


def on_forward(cap: CaptureState, runner, scheduler_output, aux_hidden_states) -> None:
    """After the target's forward on an EAGLE-3 engine: `aux_hidden_states` is vLLM's list of [num_tokens, H]
    tensors, one per layer in the head's eagle_aux_hidden_state_layer_ids (GPUModelRunner.execute_model_state,
    consumed by sample_tokens -> propose_draft_token_ids right after)."""
    total = int(scheduler_output.total_num_scheduled_tokens)
    req_ids = runner.input_batch.req_ids
    qsl = runner.query_start_loc.cpu[: len(req_ids) + 1].numpy()
    counts = scheduler_output.num_scheduled_tokens
    cap.on_hidden(HiddenStep(req_ids=req_ids, starts=[int(qsl[i]) for i in range(len(req_ids))],
                             counts=[int(counts.get(rid, 0)) for rid in req_ids],
                             hidden=[h[:total] for h in aux_hidden_states], positions=runner.positions[:total]),
                  functools.partial(request_info, runner))


def install_runner_hooks(worker) -> None:
    """Wrap the runner's `_sample` (verification: target distribution, drafts, what was accepted),
    `execute_model` (flush finished requests before a step; EAGLE-3 hidden states after the forward) and
    `sample_tokens`; the last two under the worker's lock so an RPC (swap, reconfigure) never interleaves a step."""
    runner = worker.model_runner
    if getattr(runner, "_lkserve_hooked", False):
        return
    install_rejection_sample_hook()
    lock = worker._lkserve_lock
    orig_sample, orig_execute, orig_sample_tokens = runner._sample, runner.execute_model, runner.sample_tokens

    def _sample(logits, spec_decode_metadata):
        cap: CaptureState | None = worker._lkserve_capture
        if spec_decode_metadata is None or cap is None or not cap.enabled:
            return orig_sample(logits, spec_decode_metadata)
        slot = {"target_logits": None, "draft_probs": None}
        _tls.slot = slot
        try:
            out = orig_sample(logits, spec_decode_metadata)
        finally:
            _tls.slot = None
        cap.guarded("capture hook", on_verify, cap, runner, spec_decode_metadata, out, slot, logits)
        return out

    def execute_model(scheduler_output, *args, **kwargs):
        with lock:
            cap: CaptureState | None = worker._lkserve_capture
            if cap is not None:
                t0 = time.perf_counter()
                try:
                    cap.before_step(getattr(scheduler_output, "finished_req_ids", ()),
                                    functools.partial(request_info, runner))
                except Exception:
                    cap.stats["errors"] += 1
                    logger.exception("lkserve: capture flush failed")
                cap.stats["hook_seconds"] += time.perf_counter() - t0
            out = orig_execute(scheduler_output, *args, **kwargs)
            if cap is not None and cap.enabled and cap.hidden:
                state = getattr(runner, "execute_model_state", None)
                aux = getattr(state, "aux_hidden_states", None) if state is not None else None
                if aux:
                    cap.guarded("hidden-state capture", on_forward, cap, runner, scheduler_output, aux)
            return out

    def sample_tokens(*args, **kwargs):
        with lock:
            return orig_sample_tokens(*args, **kwargs)

    runner._sample = _sample
    runner.execute_model = execute_model
    runner.sample_tokens = sample_tokens
    runner._lkserve_hooked = True


def aux_layers(runner) -> list[int] | None:
    """The target layers whose hidden states feed an EAGLE-3 head (vLLM numbering), None without EAGLE-3."""
    if not getattr(runner, "use_aux_hidden_state_outputs", False):
        return None
    model = runner.get_model()
    for m in (model, getattr(model, "model", None)):
        layers = getattr(m, "aux_hidden_state_layers", None)
        if layers is not None:
            return [int(x) for x in layers]
    return None
