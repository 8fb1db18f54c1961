"""Exactness of probabilistic verification when drafts are not from the last proposal (docs/engine.md, "Draft
probabilities across skipped steps"): vLLM's own rejection sampler with its CPU kernels (kernel level), then engines
whose scheduler pads placeholder drafts (a prefix-cache hit of all but one prompt token) or skips requests (a tight
token budget). Fixed seeds; chi-square tests at level 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    """Even requests: a real draft from q; odd: a placeholder (-1) with a zero q row, as the draft-probs cache builds
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
