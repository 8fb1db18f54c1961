"""Exactness of probabilistic verification when drafts are not from the last proposal (docs/engine.md, "Draft
probabilities across skipped steps"): vLLM's own rejection sampler with its CPU kernels (kernel level), then engines
whose scheduler pads placeholder drafts (a prefix-cache hit of all but one prompt token). Fixed seeds; chi-square tests
at level 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lkserve.models.tiny import TINY_VOCAB

P = torch.tensor([0.1, 0.2, 0.3, 0.4])  # the target's distribution
Q = torch.tensor([0.4, 0.3, 0.2, 0.1])  # the draft's: sum min(p, q) = 0.6, sum p*q = 0.2
N = 20_000  # single-draft requests per kernel call


@pytest.fixture(scope="module")
def rs():
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON or not current_platform.is_cpu():
        pytest.skip("the C++ CPU rejection kernels are what is tested")
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample import rejection_sampler

    from lkserve.engine.vllm import draft_probs

    draft_probs.apply_placeholder_fix()
    assert draft_probs.placeholder_state["applied"], draft_probs.placeholder_state
    return rejection_sampler


def _metadata(n: int):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    empty = torch.empty(0)
    return SamplingMetadata(temperature=torch.ones(n), all_greedy=False, all_random=True, top_p=None, top_k=None,
                            generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
                            frequency_penalties=empty, presence_penalties=empty, repetition_penalties=empty,
                            output_token_ids=[[] for _ in range(n)], allowed_token_ids_mask=None,
                            bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def _verify(rs, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """vLLM's `rejection_sample` on N requests of one draft each: [N, 2] (emitted token, bonus or -1)."""
    torch.manual_seed(seed)
    n = draft_ids.shape[0]
    return rs.rejection_sample(draft_ids.to(torch.int32), [1] * n, 1, torch.arange(1, n + 1, dtype=torch.int32),
                               draft_probs, P.log().expand(n, -1).contiguous(),
                               torch.full((n, 1), 3, dtype=torch.int64), _metadata(n))


def _drafts(seed: int = 1) -> torch.Tensor:
    return torch.multinomial(Q, N, replacement=True, generator=torch.Generator().manual_seed(seed))


def _chi2_vs_p(tokens: torch.Tensor) -> float:
    counts = np.bincount(tokens.numpy(), minlength=4)[:4]
    assert counts.sum() == tokens.numel(), "emitted tokens outside the vocabulary"
    return chi2_pvalue(counts, P.numpy() * counts.sum())


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit: P(X >= stat) for X ~ chi2(bins - 1)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2.0), torch.tensor(stat / 2.0)))


def test_with_draft_probs_acceptance_is_sum_min_and_output_is_p(rs):
    out = _verify(rs, _drafts(), Q.expand(N, -1).contiguous())
    accepted = (out[:, 1] != -1).float().mean().item()
    assert abs(accepted - 0.6) < 4 * (0.6 * 0.4 / N) ** 0.5
    assert _chi2_vs_p(out[:, 0]) > 1e-3


def test_without_draft_probs_acceptance_falls_to_sum_p_q(rs):
    """What vLLM's fallback (no cached draft probabilities: point-mass q) costs: exact, but 0.2 instead of 0.6."""
    out = _verify(rs, _drafts(), None)
    accepted = (out[:, 1] != -1).float().mean().item()
    assert abs(accepted - 0.2) < 4 * (0.2 * 0.8 / N) ** 0.5
    assert _chi2_vs_p(out[:, 0]) > 1e-3


def _mixed(with_probs: bool):
    """Even requests: a real draft from q; odd: a placeholder (-1) with a zero q row, as `install_placeholder_rows` builds
    them (or no draft probabilities at all, vLLM's fallback)."""
    ids = _drafts()
    ids[1::2] = -1
    q = Q.expand(N, -1).clone()
    q[1::2] = 0.0
    return ids, q if with_probs else None


@pytest.mark.parametrize("with_probs", [True, False], ids=["zero-q-rows", "no-draft-probs"])
def test_placeholder_drafts_are_rejected_and_output_is_p(rs, with_probs):
    ids, q = _mixed(with_probs)
    out = _verify(rs, ids, q)
    assert (out[1::2, 1] == -1).all(), "a placeholder draft was accepted"
    assert _chi2_vs_p(out[1::2, 0]) > 1e-3
    real = (out[0::2, 1] != -1).float().mean().item()
    expected = 0.6 if with_probs else 0.2
    assert abs(real - expected) < 4 * (expected * (1 - expected) / (N // 2)) ** 0.5
    assert _chi2_vs_p(out[0::2, 0]) > 1e-3


@pytest.mark.parametrize("with_probs", [True, False], ids=["zero-q-rows", "no-draft-probs"])
def test_cpu_kernel_without_the_fix_accepts_placeholders(rs, with_probs, monkeypatch):
    """vLLM 0.32's C++ kernel does not check negative drafts (the Triton kernel does): it reads p and q at index -1
    (the previous row's last entry) and accepts placeholders. Shows the fix is needed; if this starts failing, vLLM
    fixed its kernel and the placeholder fix can go."""
    monkeypatch.setattr(rs, "_rejection_random_sample", rs._rejection_random_sample._lkserve_original)
    ids, q = _mixed(with_probs)
    out = _verify(rs, ids, q)
    assert (out[1::2, 1] != -1).float().mean().item() > 0.05


# ---------------------------------------------------------------------------------------------- engines

def _draft_probs_info(handle) -> dict:
    return handle.run(handle.engine.info())["draft_probs_fix"]


def _capture_errors(handle) -> int:
    return handle.run(handle.engine.info())["capture"]["errors"]


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("misses", "placeholders")}


BLOCK = 128  # vLLM's CPU KV block: a prompt of BLOCK + 1 tokens whose first block is cached has 1 token to prefill


def _long_prompt(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, 500, BLOCK + 1)]


def _engine(tiny, engine_loop, draft: str, version: str, **env):
    from tests.conftest import EngineHandle, _capture, _env, _settings, _start

    with _env(**env):
        engine = _start(engine_loop, _settings(tiny, draft_model=draft), _capture(enabled=False),
                        draft_version=version)
    return EngineHandle(engine, engine_loop)


def _sp(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)


def test_placeholder_step_emits_a_token_from_the_target(spec_engine, tiny):
    """A prefix-cache hit of all but one prompt token: the scheduler pads K placeholder drafts; the first output token
    must come from the target's p, not from the draft nor the CPU kernel's out-of-row reads."""
    import torch
    from transformers import AutoModelForCausalLM

    spec_engine.use_draft("random")
    prompt = _long_prompt(7)
    spec_engine.generate(prompt, _sp(1))  # caches the first block
    before, errors = _draft_probs_info(spec_engine), _capture_errors(spec_engine)
    res = spec_engine.generate_many([(prompt, _sp(1 if i % 60 else 16)) for i in range(480)])  # 8 go on
    d = _delta(_draft_probs_info(spec_engine), before)
    assert d["placeholders"] >= 400 and d["misses"] == 0, d
    # capture keeps no placeholder position (it stored -1 as draft id 2**32 - 1, or failed indexing q at -1)
    assert _capture_errors(spec_engine) == errors
    records = spec_engine.drain()
    assert records and all(int(r.draft_token_ids.max(initial=0)) < TINY_VOCAB for r in records)
    first = np.array([r.token_ids[0] for r in res])
    with torch.no_grad():
        models = {name: AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
                  for name, path in (("target", tiny.target), ("draft", tiny.random_draft))}
        dist = {name: torch.softmax(m(torch.tensor([prompt])).logits[0, -1], -1).numpy() for name, m in models.items()}
    pv = {name: _binned_pvalue(first, p) for name, p in dist.items()}
    print("first-token chi-square p-values", pv, d)
    assert pv["target"] > 1e-3
    assert pv["draft"] < 1e-6  # the test can tell the two apart


def _binned_pvalue(tokens: np.ndarray, p: np.ndarray) -> float:
    """Chi-square of sampled tokens against p, with the tokens of expected count < 5 pooled into one bin."""
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(p)).astype(float)
    big = p * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    keep = exp > 0
    return chi2_pvalue(obs[keep], exp[keep])


@pytest.fixture(scope="module")
def vllm_draft_probs_engine(tiny, engine_loop):
    """vLLM's own draft-probability bookkeeping (the cache off; the placeholder fix is process-wide and stays on)."""
    from tests.conftest import _stop

    handle = _engine(tiny, engine_loop, str(tiny.copy_draft), "target", LKSERVE_DISABLE_DRAFT_PROBS_FIX="1")
    yield handle
    _stop(engine_loop, handle.engine)


def _mixed_traffic(handle) -> tuple[float, dict]:
    """4 long requests decode while 32 requests with a cached prefix arrive one by one (each gets placeholders in a
    batch whose other requests have real drafts). The long requests' acceptance, and the counters' change."""
    import asyncio

    prompt = _long_prompt(11)
    handle.generate(prompt, _sp(1))
    rng = np.random.default_rng(0)
    others = [[int(t) for t in rng.integers(3, 500, 20)] for _ in range(4)]
    before = _draft_probs_info(handle)

    async def run():
        long = [asyncio.ensure_future(handle.agenerate(p, _sp(200))) for p in others]
        short = []
        for _ in range(32):
            await asyncio.sleep(0.05)
            short.append(asyncio.ensure_future(handle.agenerate(prompt, _sp(4))))
        return await asyncio.gather(*long, *short)

    res = handle.run(run())[:len(others)]  # the short ones' placeholders count as drafted and rejected
    drafted, accepted = sum(r.spec.drafted for r in res), sum(r.spec.accepted for r in res)
    return accepted / drafted, _delta(_draft_probs_info(handle), before)


def test_placeholders_do_not_cost_the_batch_its_draft_probabilities(spec_engine, vllm_draft_probs_engine):
    """The copy draft (q = p): with the draft probabilities every draft is accepted (p/q = 1 >= u). vLLM alone
    verifies each batch holding a placeholder request against a point-mass q: acceptance p(draft) in those steps."""
    spec_engine.use_draft("target")
    fixed, d_fixed = _mixed_traffic(spec_engine)
    vllm, d_vllm = _mixed_traffic(vllm_draft_probs_engine)
    print(f"acceptance with the fix {fixed:.4f} {d_fixed}; vLLM alone {vllm:.4f} {d_vllm}")
    assert d_fixed["placeholders"] > 0 and d_fixed["misses"] == 0, d_fixed
    assert fixed > 0.99
    assert d_vllm["misses"] == 0 and d_vllm["placeholders"] == 0  # the fix is off there: vLLM's own path ran
    assert vllm < 0.99  # measured 0.61-0.93 (how many steps hold a placeholder depends on timing)
