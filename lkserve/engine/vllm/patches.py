"""vLLM version check and the three patches lkserve applies to vLLM 0.32 in every vLLM process (the
`vllm.general_plugins` entry point `register_plugin`). Each can be switched off with its LKSERVE_DISABLE_*_FIX=1
variable, which the tests use to show each bug is real."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

logger = logging.getLogger("lkserve.engine")

SUPPORTED_VLLM = ("0.32.",)  # version prefixes this package was written and tested against

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
            f"lkserve.engine.vllm was written for vLLM {'/'.join(v + 'x' for v in SUPPORTED_VLLM)}, "
            f"found {version}: the capture hook, weight swap and CPU fix touch vLLM internals and may break. "
            "Re-check lkserve/engine/vllm/ (and docs/engine.md) against this version."
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
        from vllm.platforms import current_platform

        # the build of vllm._C this CPU runs (registers torch.ops._C.expand_kernel_impl); `import vllm._C` itself
        # is the AVX-512 build and dies with SIGILL on an AVX2-only CPU
        current_platform.import_kernels()
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


def fix_states() -> dict[str, dict[str, Any]]:
    """What each patch did in this process (for `lkserve_info`)."""
    return {"cpu_fix": dict(_fix_state), "empty_draft_fix": dict(_empty_fix_state),
            "seeded_draft_fix": dict(_seed_fix_state)}


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
        raise  # LKSERVE_STRICT_VLLM_VERSION=1
    except Exception as e:  # noqa: BLE001
        logger.warning("lkserve: vLLM version check failed: %r", e)
    apply_cpu_fixes()
    apply_empty_draft_fix()
    apply_seeded_draft_fix()
    from lkserve.engine.vllm import lifeline

    lifeline.start()  # an engine core / worker process exits when its parent dies (lifeline.py)

