"""The serving engine: vLLM's `AsyncLLM` with a draft model, capture at verification time and draft hot-swap.

Small typed surface for the gateway and the worker:

    engine = await Engine.create(EngineSettings(...), CaptureSettings(...), sink_spec)
    async for chunk in engine.generate(prompt_ids, SamplingParams(...), "req-1"):
        ...  # chunk.token_ids / chunk.text (deltas), chunk.finish_reason, chunk.spec (at the end)
    res = await engine.swap_draft("/path/to/draft-v2", "v2", sha256=None)
    await engine.shutdown()

Everything that touches vLLM internals is in `vllm_adapter.py`; this module only uses vLLM's public API
(`AsyncEngineArgs`, `AsyncLLM`, `SamplingParams`, `collective_rpc`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lkserve.config import CaptureSettings, EngineSettings
from lkserve.engine import vllm_adapter as va
from lkserve.metrics import serving as metrics

logger = logging.getLogger("lkserve.engine")


@dataclass
class SpecStats:
    """Per-request speculative decoding statistics (from vLLM's per-request 'detailed' metrics)."""

    num_spec_tokens: int
    steps: int
    drafted: int
    accepted: int
    per_step_drafted: list[int] = field(default_factory=list)
    per_step_accepted: list[int] = field(default_factory=list)
    per_position_drafted: list[int] = field(default_factory=list)  # [K]: steps that drafted position j
    per_position_accepted: list[int] = field(default_factory=list)  # [K]: steps that accepted position j

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def verified_positions(self) -> int:
        """Drafted positions the rejection sampler decided on: all accepted ones plus the first rejected one."""
        return sum(min(a + 1, d) for a, d in zip(self.per_step_accepted, self.per_step_drafted))

    @classmethod
    def from_vllm(cls, m) -> SpecStats | None:
        if m is None:
            return None
        k = int(m.num_spec_tokens)
        steps_acc = list(m.per_step_accepted or [])
        steps_dr = list(m.per_step_drafted or [])
        pos_dr = [sum(1 for d in steps_dr if d > j) for j in range(k)]
        pos_acc = [sum(1 for a in steps_acc if a > j) for j in range(k)]
        accepted = sum(j * c for j, c in enumerate(m.histogram))
        return cls(num_spec_tokens=k, steps=sum(m.histogram), drafted=int(m.num_draft_tokens), accepted=accepted,
                   per_step_drafted=steps_dr, per_step_accepted=steps_acc,
                   per_position_drafted=pos_dr, per_position_accepted=pos_acc)


@dataclass
class GenerationChunk:
    """One streamed piece of a request's output (deltas) — the last one has finish_reason and spec."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative
    spec: SpecStats | None = None


@dataclass
class SwapResult:
    ok: bool
    version: str  # the version serving after the call (the old one when refused)
    reason: str
    seconds: float
    sha256: str | None = None
    requested_version: str | None = None
    validate_seconds: float = 0.0
    apply_seconds: float = 0.0


def _speculative_config(settings: EngineSettings, draft_dir: str | None) -> dict[str, Any] | None:
    k = settings.num_speculative_tokens
    if settings.method == "none":
        return None
    if settings.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    if settings.method == "draft_model":
        return {
            "method": "draft_model",
            "model": draft_dir,
            "num_speculative_tokens": k,
            # probabilistic + standard: the real min(1, p/q) test, acceptance = sum min(p, q).
            # greedy: the draft is treated as certain of its argmax (acceptance = p(argmax)).
            "draft_sample_method": settings.draft_sample_method,
            "rejection_sample_method": "standard",
        }
    if settings.method == "eagle3":
        # draft_dir is an EAGLE-3 head (speculators layout, lkserve/models/eagle3.py); it drafts from the target's
        # auxiliary hidden states, and its truncated vocabulary (d2t) is mapped back to target ids by vLLM.
        return {
            "method": "eagle3",
            "model": draft_dir,
            "num_speculative_tokens": k,
            "draft_sample_method": settings.draft_sample_method,
            "rejection_sample_method": "standard",
        }
    raise ValueError(f"unknown speculative method {settings.method!r}")


def _resolve_models(settings: EngineSettings) -> tuple[str, str | None]:
    target, draft = settings.target_model, settings.draft_model
    if target is None or (draft is None and settings.method in ("draft_model", "eagle3")):
        from lkserve.config import default_cache_dir
        from lkserve.models.prepare import prepare_default_models

        t, d = prepare_default_models(default_cache_dir(), method=settings.method)
        target = target or str(t)
        draft = draft or str(d)
    return str(target), (str(draft) if draft else None)


class Engine:
    """AsyncLLM + speculative decoding + capture + draft hot-swap. Create with `await Engine.create(...)`."""

    def __init__(self, llm, settings: EngineSettings, capture: CaptureSettings, model_id: str,
                 draft_dir: str | None, in_process: bool):
        self._llm = llm
        self.settings = settings
        self.capture_settings = capture
        self.model_id = model_id
        self.draft_dir = draft_dir
        self.in_process = in_process
        self.max_model_len = int(llm.model_config.max_model_len)
        self.tokenizer = llm.get_tokenizer()
        self.draft_version: str | None = None
        self.draft_sha256: str | None = None
        self.start_seconds = 0.0
        self._running: set[str] = set()
        self._finished: collections.deque[str] = collections.deque(maxlen=65536)  # for drain_capture
        self._swap_lock = asyncio.Lock()
        self._salt_prefix_cache = settings.method in ("draft_model", "eagle3")
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        settings: EngineSettings,
        capture: CaptureSettings,
        sink_spec: dict | None = None,
        *,
        in_process: bool | None = None,
        model_id: str | None = None,
        draft_version: str = "base",
    ) -> Engine:
        """Start vLLM. in_process=True runs the worker inside the engine-core process (uniproc executor,
        VLLM_ENABLE_V1_MULTIPROCESSING=0, set process-wide); None reads that variable; False = vLLM's default."""
        va.check_vllm_version()
        t0 = time.perf_counter()
        for k, v in va.engine_env_defaults().items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        if in_process is None:
            in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        elif in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        target, draft = _resolve_models(settings)
        spec = _speculative_config(settings, draft)
        args = AsyncEngineArgs(
            model=target,
            tokenizer=target,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            speculative_config=spec,
            worker_extension_cls=va.EXTENSION_CLS,
            per_request_spec_decode_metrics="detailed" if spec else "none",
            # capture reads each request's token state right after sampling; CPU forces this off anyway
            async_scheduling=False,
            distributed_executor_backend="uni" if in_process else None,
            disable_log_stats=False,
        )
        llm = AsyncLLM.from_engine_args(args)
        engine = cls(llm, settings, capture, model_id or Path(target).name, draft, in_process)
        try:
            cap_spec = {
                "enabled": capture.enabled,
                "sample_rate": capture.sample_rate,
                "top_k": capture.top_k,
                "max_positions_per_record": capture.max_positions_per_record,
                "queue_size": capture.queue_size,
                "seed": settings.seed,
                "model_id": engine.model_id,
                "sink": sink_spec or {"kind": "memory", "maxlen": capture.queue_size},
                "initial_version": draft_version,
                "hidden_states": capture.hidden_states and settings.method == "eagle3",
                "hidden_dtype": capture.hidden_dtype,
                "hidden_context": capture.hidden_context,
            }
            await engine._rpc("lkserve_configure_capture", cap_spec)
            info = await engine.draft_info()
            engine.draft_version = info.get("version")
            engine.draft_sha256 = info.get("sha256")
            metrics.set_version(engine.draft_version)
        except BaseException:
            llm.shutdown()
            raise
        engine.start_seconds = time.perf_counter() - t0
        logger.info("lkserve engine up in %.1fs (method=%s, K=%d, in_process=%s)", engine.start_seconds,
                    settings.method, settings.num_speculative_tokens, in_process)
        return engine

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._llm.shutdown()
        await asyncio.sleep(0)
        self._llm.shutdown = lambda *a, **k: None  # AsyncLLM.__del__ would shut down again at interpreter exit

    @property
    def llm(self):
        """The underlying AsyncLLM (for metrics and tests)."""
        return self._llm

    # -- generation ------------------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling,
        request_id: str,
        capture: bool = True,
        tags: dict | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output. `sampling` is a vllm.SamplingParams (copied, not modified); n must be 1."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = sampling.clone()
        if sp.n != 1:
            raise ValueError("Engine.generate supports n=1 only")
        sp.output_kind = RequestOutputKind.DELTA
        extra = dict(sp.extra_args or {})
        extra[va.EXTRA_ARGS_KEY] = {"capture": bool(capture), "tags": {str(k): str(v) for k, v in (tags or {}).items()},
                                    "rid": request_id}
        sp.extra_args = extra
        self._running.add(request_id)
        num_out = 0
        t_submit = time.perf_counter()
        t_first = t_last = None
        finish_reason, num_prompt = None, len(prompt_token_ids)
        try:
            prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
            if self._salt_prefix_cache:
                # The draft's KV lives in the same prefix-cached blocks as the target's: salting the cache with the
                # draft version keeps requests after a swap from reusing draft KV the old weights computed.
                prompt["cache_salt"] = f"lkserve-draft:{self.draft_version}"
            async for out in self._llm.generate(prompt, sp, request_id):
                c = out.outputs[0]
                ids = list(c.token_ids)
                num_out += len(ids)
                finished = bool(out.finished)
                now = time.perf_counter()
                if ids:
                    metrics.observe_tokens(len(ids), None if t_last is None else now - t_last)
                    t_first = t_first or now
                    t_last = now
                spec = SpecStats.from_vllm(c.spec_decode_metrics) if finished else None
                if finished:
                    finish_reason = c.finish_reason
                    num_prompt = len(out.prompt_token_ids or prompt_token_ids)
                    metrics.observe_spec(self.draft_version, spec)
                yield GenerationChunk(
                    request_id=request_id,
                    token_ids=ids,
                    text=c.text,
                    finished=finished,
                    finish_reason=c.finish_reason,
                    num_prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    num_output_tokens=num_out,
                    spec=spec,
                )
        finally:
            self._running.discard(request_id)
            self._finished.append(request_id)
            metrics.observe_request(finish_reason, num_prompt, None if t_first is None else t_first - t_submit,
                                    time.perf_counter() - t_submit)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)
        self._running.discard(request_id)

    @property
    def num_running(self) -> int:
        """Requests vLLM still holds (waiting + running), as its output processor counts them."""
        return int(self._llm.get_num_unfinished_requests())

    # -- draft weights ---------------------------------------------------------------------------------------
    async def swap_draft(self, path: str | os.PathLike, version: str, sha256: str | dict | None = None,
                         recompute_running: bool = False) -> SwapResult:
        """Validate then load a new draft checkpoint (HF layout) between two engine steps. Never raises for a bad
        checkpoint: the old weights keep serving and the result says why.

        Requests already running keep the draft KV cache the old weights computed for their prefix (their acceptance
        only partly benefits); requests submitted afterwards use a new prefix-cache salt, so they start clean.
        recompute_running=True also preempts every running request so it re-prefills with the new draft (a stall
        of one prefill of all running tokens; nothing is lost)."""
        async with self._swap_lock:
            t0 = time.perf_counter()
            try:
                results = await self._llm.collective_rpc("lkserve_swap_draft", args=(str(path), str(version), sha256))
            except Exception as e:  # noqa: BLE001
                return SwapResult(False, self.draft_version or "", f"rpc failed: {e!r}", time.perf_counter() - t0)
            oks = [r for r in results if r.get("ok")]
            if len(oks) != len(results):  # several workers (TP): all or nothing would need a second phase
                bad = next(r for r in results if not r.get("ok"))
                if oks:
                    logger.error("lkserve: draft swap applied on %d of %d workers", len(oks), len(results))
                r = bad
            else:
                r = results[0]
            res = SwapResult(ok=bool(r["ok"]), version=r["version"], reason=r["reason"],
                             seconds=time.perf_counter() - t0, sha256=r.get("sha256"),
                             requested_version=r.get("requested_version"),
                             validate_seconds=r.get("validate_seconds", 0.0), apply_seconds=r.get("apply_seconds", 0.0))
            if res.ok:
                self.draft_version, self.draft_sha256 = res.version, res.sha256
                if recompute_running:
                    try:
                        await self._llm.reset_prefix_cache(reset_running_requests=True)
                    except Exception as e:  # noqa: BLE001 - the swap itself succeeded
                        res.reason = f"ok (running requests not recomputed: {e!r})"
                res.seconds = time.perf_counter() - t0
            metrics.observe_swap(res.ok, res.version, res.seconds)
            return res

    async def draft_info(self) -> dict:
        return (await self._rpc("lkserve_draft_info"))

    # -- capture ---------------------------------------------------------------------------------------------
    async def set_capture(self, enabled: bool, sample_rate: float | None = None) -> dict:
        return await self._rpc("lkserve_set_capture", bool(enabled), sample_rate)

    async def drain_capture(self) -> list:
        """Records held by a memory sink (tests); [] with a Redis sink."""
        finished = list(self._finished)
        self._finished.clear()
        results = await self._llm.collective_rpc("lkserve_drain_capture", args=(finished,))
        out = []
        for worker_records in results:
            out.extend(va.record_from_wire(d) for d in worker_records)
        return out

    async def info(self) -> dict:
        return await self._rpc("lkserve_info")

    async def _rpc(self, method: str, *args):
        results = await self._llm.collective_rpc(method, args=args)
        return results[0]
