"""Speculative decoding through lkserve's engine is lossless, and the CPU T>0 fix matters."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from tests.conftest import K, prompt_ids

pytestmark = pytest.mark.slow


def _sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


@pytest.mark.parametrize("draft", ["random", "target"])
def test_greedy_speculative_equals_non_speculative(spec_engine, nospec_engine, draft):
    spec_engine.use_draft(draft)
    prompts = prompt_ids(spec_engine, 6)
    sp = _sp(temperature=0.0, max_tokens=48)
    ref = nospec_engine.generate_many([(p, sp) for p in prompts])
    got = spec_engine.generate_many([(p, sp) for p in prompts])
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        assert len(g.token_ids) == 48
        assert g.spec is not None and g.spec.drafted > 0  # speculation really ran
    rate = sum(g.spec.accepted for g in got) / sum(g.spec.drafted for g in got)
    if draft == "target":
        assert rate > 0.99
    else:
        assert rate < 0.2


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def pooled_chi2(observed: np.ndarray, expected_rows: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic of observed tokens against per-sample expected distributions (summed); categories with
    small expected counts are pooled into one. Conservative when the rows differ (variance <= multinomial)."""
    expected = expected_rows.sum(axis=0)
    counts = np.bincount(observed, minlength=expected.shape[0]).astype(np.float64)
    big = expected >= min_expected
    e = np.append(expected[big], expected[~big].sum())
    o = np.append(counts[big], counts[~big].sum())
    keep = e > 0
    stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    return stat, int(keep.sum()) - 1


def _hf_probs(model_dir, contexts: list[list[int]], temperature: float) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ctx in contexts:
            logits = model(torch.tensor([ctx])).logits[0, -1].to(torch.float64)
            out.append(torch.softmax(logits / temperature, -1).numpy())
    return np.stack(out)


def test_temperature_sampling_is_lossless_at_verified_positions(spec_engine, tiny):
    """Random draft vs target, T=1: the 2nd generated token comes out of rejection sampling (the 1st is the prefill's
    sample). Its law given the 1st token must be the target's softmax, not the draft's: the same statistic against
    the draft's distribution (what blindly accepted drafts would give) must reject overwhelmingly."""
    spec_engine.use_draft("random")
    prompt = prompt_ids(spec_engine, 1)[0]
    n = 800
    temperature = 1.0
    jobs = [(prompt, _sp(temperature=temperature, max_tokens=2, seed=1000 + i)) for i in range(n)]
    res = spec_engine.generate_many(jobs)
    assert all(len(r.token_ids) == 2 for r in res)
    assert all(r.spec.drafted >= 1 for r in res), "every request must have had a verification step"
    t1 = np.array([r.token_ids[0] for r in res])
    t2 = np.array([r.token_ids[1] for r in res])
    acc = sum(r.spec.per_position_accepted[0] for r in res) / n

    firsts = sorted(set(t1.tolist()))
    ctx = [prompt + [t] for t in firsts]
    p_target = dict(zip(firsts, _hf_probs(tiny.target, ctx, temperature)))
    p_draft = dict(zip(firsts, _hf_probs(tiny.random_draft, ctx, temperature)))
    exp_target = np.stack([p_target[t] for t in t1])
    exp_draft = np.stack([p_draft[t] for t in t1])

    stat, df = pooled_chi2(t2, exp_target)
    p_value = chi2_sf(stat, df)
    stat_d, df_d = pooled_chi2(t2, exp_draft)
    p_value_draft = chi2_sf(stat_d, df_d)
    print(f"\nlossless: n={n} acceptance(pos0)={acc:.3f} chi2={stat:.1f} df={df} p={p_value:.3g}; "
          f"vs draft law: chi2={stat_d:.1f} df={df_d} p={p_value_draft:.3g}")
    # the draft is far from the target but not useless: some drafts are accepted, some rejected
    assert 0.02 < acc < 0.9
    assert p_value > 0.01
    assert p_value_draft < 1e-6


def _acceptance_per_position(handle, temperature: float, n_req: int = 8, max_tokens: int = 64):
    prompts = prompt_ids(handle, n_req)
    res = handle.generate_many([(p, _sp(temperature=temperature, max_tokens=max_tokens, seed=7 + i))
                                for i, p in enumerate(prompts)])
    acc = np.zeros(K)
    dr = np.zeros(K)
    for r in res:
        acc += np.array(r.spec.per_position_accepted)
        dr += np.array(r.spec.per_position_drafted)
    return acc, dr


def test_draft_equal_target_accepts_everything_at_t1_with_fix(spec_engine):
    spec_engine.use_draft("target")
    info = spec_engine.run(spec_engine.engine.info())
    assert info["cpu_fix"]["applied"], info["cpu_fix"]
    acc, dr = _acceptance_per_position(spec_engine, 1.0)
    print(f"\nwith fix, draft=target, T=1: per-position acceptance {np.round(acc / dr, 3).tolist()} "
          f"({int(acc.sum())}/{int(dr.sum())})")
    assert (acc / dr > 0.97).all()


def test_without_cpu_fix_acceptance_collapses(nofix_engine):
    info = nofix_engine.run(nofix_engine.engine.info())
    assert not info["cpu_fix"]["applied"]
    assert "LKSERVE_DISABLE_CPU_FIX" in info["cpu_fix"]["reason"]
    acc, dr = _acceptance_per_position(nofix_engine, 1.0)
    print(f"\nwithout fix, draft=target, T=1: per-position acceptance {np.round(acc / dr, 3).tolist()} "
          f"({int(acc.sum())}/{int(dr.sum())})")
    assert acc.sum() / dr.sum() < 0.7


def test_greedy_is_unaffected_by_the_cpu_bug(nofix_engine, nospec_engine):
    """At T=0 the rejection sampler never expands temperatures: outputs match even without the fix."""
    prompts = prompt_ids(nofix_engine, 3)
    sp = _sp(temperature=0.0, max_tokens=32)
    ref = nospec_engine.generate_many([(p, sp) for p in prompts])
    got = nofix_engine.generate_many([(p, sp) for p in prompts])
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert collections.Counter(g.spec.accepted == g.spec.drafted for g in got)[True] == len(got)
