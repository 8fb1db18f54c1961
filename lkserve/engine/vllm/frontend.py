"""vLLM's public API as the engine uses it: construction (AsyncEngineArgs / AsyncLLM, VLLM_* environment,
speculative config), per-request conversions (SamplingParams, TokensPrompt, RequestOutputKind), the per-request
spec-decode metrics -> SpecStats and the outputs' logprobs -> TokenLogprob."""

from __future__ import annotations

import os
from typing import Any

from lkserve.config import EngineSettings
from lkserve.engine.types import SpecStats, TokenLogprob
from lkserve.engine.vllm.hooks import EXTRA_ARGS_KEY

EXTENSION_CLS = "lkserve.engine.vllm.worker.LkserveWorkerExtension"


def engine_env_defaults() -> dict[str, str]:
    """Environment vLLM must see before it starts (set unless already set)."""
    return {
        # On GPU: stay on the V1 GPUModelRunner whose `_sample` we hook (the V2 runner is a different code path).
        "VLLM_USE_V2_MODEL_RUNNER": "0",
    }


def prepare_env(kv_cache_gib: int, in_process: bool) -> None:
    """Set vLLM's environment (process-wide). in_process=True runs the worker inside the engine-core process
    (uniproc executor, VLLM_ENABLE_V1_MULTIPROCESSING=0); False gives it a process of its own (vLLM's default
    layout). Set both ways: the variable is process-wide, and a later engine of the other layout must not inherit it
    (on CPU vLLM turns "uni" into "mp" unless it reads 0)."""
    for k, v in engine_env_defaults().items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"


def speculative_config(settings: EngineSettings, draft_dir: str | None) -> dict[str, Any] | None:
    k = settings.num_speculative_tokens
    if settings.method == "none":
        return None
    if settings.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    if settings.method in ("draft_model", "eagle3"):
        # eagle3: draft_dir is an EAGLE-3 head (speculators layout, lkserve/models/eagle3.py); it drafts from the
        # target's auxiliary hidden states, and its truncated vocabulary (d2t) is mapped back to target ids by vLLM.
        # probabilistic + standard: the real min(1, p/q) test, acceptance = sum min(p, q).
        # greedy: the draft is treated as certain of its argmax (acceptance = p(argmax)).
        return {"method": settings.method, "model": draft_dir, "num_speculative_tokens": k,
                "draft_sample_method": settings.draft_sample_method, "rejection_sample_method": "standard"}
    raise ValueError(f"unknown speculative method {settings.method!r}")


def start_async_llm(settings: EngineSettings, target: str, draft: str | None, in_process: bool):
    """vLLM's AsyncLLM with lkserve's worker extension and per-request spec-decode metrics."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    spec = speculative_config(settings, draft)
    args = AsyncEngineArgs(
        model=target,
        tokenizer=target,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        speculative_config=spec,
        worker_extension_cls=EXTENSION_CLS,
        per_request_spec_decode_metrics="detailed" if spec else "none",
        # capture reads each request's token state right after sampling; CPU forces this off anyway
        async_scheduling=False,
        distributed_executor_backend="uni" if in_process else None,
        disable_log_stats=False,
    )
    return AsyncLLM.from_engine_args(args)


def shutdown_async_llm(llm) -> None:
    llm.shutdown()
    llm.shutdown = lambda *a, **k: None  # AsyncLLM.__del__ would shut down again at interpreter exit


def sampling_params(**kwargs):
    """A vllm.SamplingParams; vLLM's own checks raise ValueError (VLLMValidationError) or TypeError."""
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def request_params(sampling, request_id: str, capture: bool, tags: dict | None):
    """A copy of `sampling` that streams deltas and carries what the capture hooks read (extra_args)."""
    from vllm.sampling_params import RequestOutputKind

    sp = sampling.clone()
    if sp.n != 1:
        raise ValueError("Engine.generate supports n=1 only")
    sp.output_kind = RequestOutputKind.DELTA
    extra = dict(sp.extra_args or {})
    extra[EXTRA_ARGS_KEY] = {"capture": bool(capture), "tags": {str(k): str(v) for k, v in (tags or {}).items()},
                             "rid": request_id}
    sp.extra_args = extra
    return sp


def tokens_prompt(prompt_token_ids: list[int], cache_salt: str | None = None):
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


def spec_stats(m) -> SpecStats | None:
    """vLLM's per-request 'detailed' spec-decode metrics (CompletionOutput.spec_decode_metrics) as SpecStats."""
    if m is None:
        return None
    return SpecStats.from_steps(int(m.num_spec_tokens), list(m.histogram), int(m.num_draft_tokens),
                                list(m.per_step_drafted or []), list(m.per_step_accepted or []))


def output_logprobs(sp, out) -> tuple[list[TokenLogprob] | None, list[TokenLogprob | None] | None]:
    """(logprobs of this delta's tokens, prompt logprobs) of a RequestOutput, None for what `sp` did not ask.
    vLLM hands the prompt logprobs over once, with the first output (RequestOutputKind.DELTA pops them)."""
    c = out.outputs[0]
    sampled = None
    if sp.logprobs is not None:
        sampled = token_logprobs(list(c.token_ids), c.logprobs or [], sp.logprobs)
        if len(sampled) != len(c.token_ids):  # vLLM slices them with the tokens (stop strings included)
            raise RuntimeError(f"vLLM returned {len(sampled)} logprobs for {len(c.token_ids)} tokens")
    prompt = None
    if sp.prompt_logprobs is not None and out.prompt_logprobs is not None:
        prompt = token_logprobs(list(out.prompt_token_ids or []), out.prompt_logprobs, sp.prompt_logprobs)
    return sampled, prompt


def token_logprobs(token_ids: list[int], positions, num_top: int) -> list[TokenLogprob | None]:
    """vLLM's per-position {token id: Logprob} (the sampled or prompt token first, then the `num_top` most likely
    ones, merged when it is one of them) as TokenLogprobs; None where vLLM has none (the first prompt token)."""
    out: list[TokenLogprob | None] = []
    for tid, pos in zip(token_ids, positions):
        if not pos or tid not in pos:
            out.append(None)
            continue
        chosen = pos[tid]
        # the chosen token is one of the top ones when it was merged into them (a tie at the boundary can give it a
        # rank <= num_top without being among torch.topk's picks)
        alts = [(t, lp) for t, lp in pos.items() if t != tid or len(pos) <= num_top]
        alts.sort(key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        out.append(TokenLogprob(
            token_id=int(tid), token=chosen.decoded_token or "", logprob=float(chosen.logprob),
            rank=int(chosen.rank) if chosen.rank is not None else 0,
            top=[(int(t), lp.decoded_token or "", float(lp.logprob)) for t, lp in alts[:num_top]],
        ))
    return out
