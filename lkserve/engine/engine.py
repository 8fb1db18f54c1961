"""The serving engine: vLLM's `AsyncLLM` with a draft model, capture at verification time and draft hot-swap.

Small typed surface for the gateway and the worker:

    engine = await Engine.create(EngineSettings(...), CaptureSettings(...), sink_spec)
    async for chunk in engine.generate(prompt_ids, sampling_params(max_tokens=64), "req-1"):
        ...  # chunk.token_ids / chunk.text (deltas), chunk.finish_reason, chunk.spec (at the end),
             # chunk.logprobs (one TokenLogprob per token when sampling asked logprobs=n)
    res = await engine.swap_draft("/path/to/draft-v2", "v2", sha256=None)
    await engine.shutdown()

vLLM itself is reached only through `lkserve.engine.vllm` (plain functions); `sampling_params(**kw)` builds the
`sampling` object `generate` takes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from lkserve.capture.record import record_from_wire
from lkserve.config import CaptureSettings, EngineSettings
from lkserve.engine import spec_k
from lkserve.engine import vllm as va
from lkserve.engine.types import EngineStopped, SpecStats, TokenLogprob
from lkserve.engine.vllm import sampling_params
from lkserve.metrics import serving as metrics

__all__ = ["Engine", "GenerationChunk", "SpecStats", "SwapResult", "TokenLogprob", "sampling_params"]

logger = logging.getLogger("lkserve.engine")


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
    # sampling logprobs=n: one entry per token of token_ids (the target's, see TokenLogprob); else None
    logprobs: list[TokenLogprob] | None = None
    # sampling prompt_logprobs=n: one entry per prompt token (None for the first), in the first chunk only
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
    spec_k: int | None = None  # K drafted from now on (engine.adaptive_k applies the recommended K at a swap)
    k_reason: str = ""


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
        self.layout = "in_process" if in_process else "multiprocess"
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
        self._stopping: str | None = None  # why requests are refused / were aborted (abort_all)
        # K drafted per step now: the configured K until set_spec_k lowers it (None: no speculation)
        self.spec_k: int | None = settings.num_speculative_tokens if settings.method != "none" else None
        self._steps_since_k = 0  # verification steps since adaptive_k last looked (k_interval_steps)
        self._k_version: str | None = None  # the last version adaptive_k has decided for from its own traffic
        self._k_task: asyncio.Task | None = None
        self.step_cost_rows: list[dict] = []  # the worker's measured seconds per step by (K, batch size)

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
        VLLM_ENABLE_V1_MULTIPROCESSING=0, set process-wide); False gives it a process of its own (vLLM's default);
        None follows `settings.layout`."""
        va.check_vllm_version()
        t0 = time.perf_counter()
        if in_process is None:
            in_process = settings.layout == "in_process"
        va.prepare_env(settings.kv_cache_gib, in_process)
        target, draft = _resolve_models(settings)
        llm = va.start_async_llm(settings, target, draft, in_process)
        engine = cls(llm, settings, capture, model_id or Path(target).name, draft, in_process)
        try:
            await engine.configure_capture(capture, sink_spec, initial_version=draft_version)
            info = await engine.draft_info()
            engine.draft_version = info.get("version")
            engine.draft_sha256 = info.get("sha256")
            metrics.set_version(engine.draft_version)
        except BaseException:
            llm.shutdown()
            raise
        engine.start_seconds = time.perf_counter() - t0
        logger.info("lkserve engine up in %.1fs (method=%s, K=%d, layout=%s)", engine.start_seconds,
                    settings.method, settings.num_speculative_tokens, engine.layout)
        return engine

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = self._stopping or "the engine was shut down"
        if self._k_task is not None:  # an adaptive_k RPC in flight finishes before vLLM goes
            await asyncio.gather(self._k_task, return_exceptions=True)
        va.shutdown_async_llm(self._llm)
        await asyncio.sleep(0)

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
        """Stream a request's output. `sampling` comes from `sampling_params(...)` (copied, not modified); n must
        be 1."""
        if self._stopping:
            raise EngineStopped(self._stopping)
        sp = va.request_params(sampling, request_id, capture, tags)
        self._running.add(request_id)
        num_out = 0
        t_submit = time.perf_counter()
        t_first = t_last = None
        finish_reason, num_prompt = None, len(prompt_token_ids)
        try:
            # The draft's KV lives in the same prefix-cached blocks as the target's: salting the cache with the
            # draft version keeps requests after a swap from reusing draft KV the old weights computed.
            salt = f"lkserve-draft:{self.draft_version}" if self._salt_prefix_cache else None
            prompt = va.tokens_prompt(prompt_token_ids, salt)
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
                spec = va.spec_stats(c.spec_decode_metrics) if finished else None
                if finished and c.finish_reason == "abort" and self._stopping:
                    raise EngineStopped(self._stopping)  # not the client's abort: say so, not a normal end
                logprobs, prompt_logprobs = va.output_logprobs(sp, out)
                if finished:
                    finish_reason = c.finish_reason
                    num_prompt = len(out.prompt_token_ids or prompt_token_ids)
                    metrics.observe_spec(self.draft_version, spec)
                    if spec is not None and self.settings.adaptive_k:
                        self._maybe_adapt_k(spec.steps)
                yield GenerationChunk(
                    request_id=request_id,
                    token_ids=ids,
                    text=c.text,
                    finished=finished,
                    finish_reason=c.finish_reason,
                    num_prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    num_output_tokens=num_out,
                    spec=spec,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
        finally:
            self._running.discard(request_id)
            self._finished.append(request_id)
            metrics.observe_request(finish_reason, num_prompt, None if t_first is None else t_first - t_submit,
                                    time.perf_counter() - t_submit)

    async def abort_all(self, reason: str) -> int:
        """Shutting down: refuse new requests and abort the running ones; their `generate` raises
        EngineStopped(reason). Returns how many were aborted."""
        self._stopping = reason
        ids = list(self._running)
        if ids:
            await self._llm.abort(ids)
        return len(ids)

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
                old_version = self.draft_version
                self.draft_version, self.draft_sha256 = res.version, res.sha256
                if self.settings.adaptive_k:
                    res.k_reason = await self._apply_recommended_k(old_version)
                res.spec_k = self.spec_k
                if recompute_running:
                    try:
                        await self._llm.reset_prefix_cache(reset_running_requests=True)
                    except Exception as e:  # noqa: BLE001 - the swap itself succeeded
                        res.reason = f"ok (running requests not recomputed: {e!r})"
                res.seconds = time.perf_counter() - t0
            metrics.observe_swap(res.ok, res.version, res.seconds)
            return res

    def recommended_k(self, version: str | None = None) -> spec_k.KChoice | None:
        """The K policy's choice from `version`'s (default: the serving one's) recent acceptance per position and
        the step-cost model (lkserve/engine/spec_k.py); None until it has enough drafts."""
        cost = self.step_cost
        version = version or self.draft_version or "unknown"  # the label observe_spec counts under
        if cost is None:
            return None
        _, drafted, accepted = metrics.recent_position_counts(version)
        return spec_k.choose_k_from_counts(drafted, accepted, cost, self.settings.num_speculative_tokens,
                                           self.settings.k_min_drafted, self.settings.k_decay)

    @property
    def step_cost(self) -> spec_k.StepCost | None:
        """cost(K) the K policy prices with: the worker's own step times as last read (refresh_step_cost) where
        engine.k_cost_online has them, the prior model (spec_k.cost_for) elsewhere; None without speculation."""
        prior = spec_k.cost_for(self.settings)
        if prior is None or not self.settings.k_cost_online:
            return prior
        return spec_k.cost_from_steps(self.step_cost_rows, prior, self.settings.k_cost_min_steps)

    async def refresh_step_cost(self, reset: bool = False) -> spec_k.StepCost | None:
        """Read the worker's recent seconds per decode-only step by (K, batch size), then `step_cost`. reset: the
        worker forgets its step times first (a benchmark arm that must start cold)."""
        if self.spec_k is not None and (self.settings.k_cost_online or reset):
            self.step_cost_rows = await self._rpc("lkserve_step_costs", self.settings.k_cost_max_age_s, reset)
        return self.step_cost

    def _probe_k(self, choice: spec_k.KChoice, cost: spec_k.StepCost | None) -> int | None:
        """engine.k_probe: a neighbour of the chosen K that has no recent measured step time in `cost`, while the
        chosen K is the one serving (so one interval at it measures its cost and, above K, its acceptance)."""
        if not (self.settings.k_probe and self.settings.k_cost_online) or choice.k != self.spec_k:
            return None
        measured = cost.measured if cost is not None else {}
        for k in (choice.k + 1, choice.k - 1):
            if 1 <= k <= self.settings.num_speculative_tokens and k not in measured:
                return k
        return None

    async def set_spec_k(self, k: int | None) -> dict:
        """Draft at most k (1..num_speculative_tokens) tokens per step from the next step on; None: the configured
        K. vLLM keeps its buffers sized for the configured K (lkserve/engine/vllm/spec_k.py)."""
        results = await self._llm.collective_rpc("lkserve_set_spec_k", args=(k,))
        bad = [r for r in results if not r.get("ok")]
        if not bad:
            self.spec_k = results[0]["k"]
        return bad[0] if bad else results[0]

    def _maybe_adapt_k(self, steps: int) -> None:
        """adaptive_k between swaps: apply the K the serving version's recent traffic recommends as soon as it has
        enough drafts to recommend one, then every k_interval_steps verification steps, in a task of its own (no
        stream waits on the RPC). So a static draft follows a shift of traffic too, not only a draft the worker
        replaces."""
        self._steps_since_k += steps
        busy = self._k_task is not None and not self._k_task.done()
        first = self._k_version != self.draft_version
        if busy or self._stopping or (not first and self._steps_since_k < self.settings.k_interval_steps):
            return
        self._steps_since_k = 0
        self._k_task = asyncio.create_task(self._adapt_k_now(self.draft_version))

    async def _adapt_k_now(self, version: str | None) -> None:
        async with self._swap_lock:  # a swap applies its own choice; this one must not interleave with it
            if version == self.draft_version:
                if self.recommended_k(version) is not None:
                    self._k_version = version  # its first decision: the next ones every k_interval_steps
                reason = await self._apply_recommended_k(version)
                logger.debug("lkserve: adaptive K: %s", reason)

    async def _apply_recommended_k(self, version: str | None) -> str:
        """adaptive_k: the K `version`'s recent traffic recommends (at a swap: the outgoing version's, for the
        incoming one)."""
        try:
            await self.refresh_step_cost()
        except Exception as e:  # noqa: BLE001 - the prior still prices K
            logger.warning("lkserve: step costs not read, the prior prices K: %r", e)
        choice = self.recommended_k(version)
        if choice is None:
            return "K kept: too few recent drafts to recommend one"
        k, why = choice.k, f"expected speedup {choice.speedup:.2f}"
        cost = self.step_cost
        if not spec_k.worth_moving(choice, cost, self.spec_k, self.settings.k_move_sigmas):
            k, why = self.spec_k, f"K={choice.k}'s expected gain is within the noise of the measured step costs"
        probe = self._probe_k(choice, cost)
        if probe is not None:
            k, why = probe, f"probing: no recent step time at K={probe}; best K {choice.k}"
        if k == self.spec_k:
            return f"K kept at {k} ({why})"
        try:
            r = await self.set_spec_k(k)
        except Exception as e:  # noqa: BLE001 - the swap itself succeeded
            return f"K not applied: {e!r}"
        if not r.get("ok"):
            return f"K not applied: {r.get('reason')}"
        logger.info("lkserve: K -> %d from %s's recent acceptance and step times (%s)", k, version, why)
        return f"K set to {k} ({why})"

    async def draft_info(self) -> dict:
        return (await self._rpc("lkserve_draft_info"))

    # -- capture ---------------------------------------------------------------------------------------------
    async def configure_capture(self, capture: CaptureSettings, sink_spec: dict | None = None,
                                initial_version: str | None = None) -> dict:
        """(Re)point the workers' capture: `capture` crosses the RPC as its model_dump; `sink_spec` is a
        `capture.sink.make_sink` spec (None: a memory sink of capture.queue_size records, see drain_capture)."""
        return await self._rpc("lkserve_configure_capture", capture.for_engine(self.settings.method).model_dump(),
                               sink_spec, self.model_id, self.settings.seed, initial_version)

    async def set_capture(self, enabled: bool, sample_rate: float | None = None) -> dict:
        return await self._rpc("lkserve_set_capture", bool(enabled), sample_rate)

    async def drain_capture(self) -> list:
        """Records held by a memory sink (tests); [] with a Redis sink."""
        finished = list(self._finished)
        self._finished.clear()
        results = await self._llm.collective_rpc("lkserve_drain_capture", args=(finished,))
        out = []
        for worker_records in results:
            out.extend(record_from_wire(d) for d in worker_records)
        return out

    async def info(self) -> dict:
        return await self._rpc("lkserve_info")

    async def _rpc(self, method: str, *args):
        results = await self._llm.collective_rpc(method, args=args)
        return results[0]
