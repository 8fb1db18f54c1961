"""The K policy (lkserve/engine/spec_k.py): hand-computed cases, extrapolation beyond the measured positions, and
the per-position counters -> conditional alpha conversion on a simulated acceptance process."""

import random

import pytest

from lkserve.engine.spec_k import (
    StepCost,
    choose_k,
    choose_k_from_counts,
    conditional_alphas,
    cost_from_profile,
    cost_from_steps,
    expected_tokens,
    extend_alphas,
    paired_ratio,
    worth_moving,
)


def test_expected_tokens_by_hand():
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([1.0] * 4, 4) == 5.0


def test_cost_model_and_measured_override():
    c = StepCost(c0=10, c_draft=2, c_verify=1)
    assert c(0) == 11 and c(3) == 10 + 6 + 4
    m = StepCost(c0=10, c_draft=2, c_verify=1, measured={3: 30.0})
    assert m(3) == 30.0 and m(2) == 10 + 4 + 3


def test_good_draft_cheap_drafting_takes_k_max():
    # alpha 0.9: E(6) = (1 - 0.9^7) / 0.1 = 5.217 over 11.3; E(5) = 4.686 over 11.1: K=6 wins
    ch = choose_k([0.9] * 6, StepCost(c0=10, c_draft=0.1, c_verify=0.1), k_max=6)
    assert ch.k == 6
    assert ch.speedup == pytest.approx((1 - 0.9 ** 7) / 0.1 / 11.3 * 10.1)
    assert ch.speculate


def test_poor_draft_k1_and_no_speculation_better():
    # alpha 0.1 at this CPU's costs: E(1) = 1.1 over 39.6 ms vs 1 token over 33.6 ms -> 0.933x
    ch = choose_k([0.1] * 4, StepCost(c0=32.6, c_draft=5.0, c_verify=1.0), k_max=4)
    assert ch.k == 1
    assert ch.speedup == pytest.approx(1.1 * 33.6 / 39.6)
    assert not ch.speculate


def test_interior_optimum():
    # alpha 0.8, cost 10 + 2K: E/cost = 0.150, 0.174, 0.1845, 0.1868, 0.1845, 0.1811 for K = 1..6 -> K=4
    ch = choose_k([0.8] * 6, StepCost(c0=10, c_draft=2, c_verify=0), k_max=6)
    assert ch.k == 4
    assert ch.expected_tokens == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert ch.speedup_by_k[5] < ch.speedup_by_k[4] > ch.speedup_by_k[3]


def test_falling_alpha_lowers_k():
    # same costs as the interior case, but acceptance collapses after position 2: K=2
    ch = choose_k([0.8, 0.8, 0.05, 0.05], StepCost(c0=10, c_draft=2, c_verify=0), k_max=4)
    assert ch.k == 2


def test_conditional_alphas_from_cumulative_counts():
    # accepted_j / drafted_j = 0.8, 0.4, 0.1 are P(0..j all accepted): conditional 0.8, 0.5, 0.25
    assert conditional_alphas([100, 100, 100], [80, 40, 10]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional_alphas([100, 100, 100], [0, 0, 0]) == [0.0, 0.0, 0.0]
    # positions with too few drafts end the measured list
    assert conditional_alphas([100, 20, 20], [50, 10, 5], min_drafted=50) == pytest.approx([0.5])
    assert choose_k_from_counts([10, 10], [9, 8], StepCost(1, 0, 0), k_max=4, min_drafted=50) is None


def test_extrapolation_holds_the_last_alpha():
    assert extend_alphas([0.9, 0.8], 4) == pytest.approx([0.9, 0.8, 0.8, 0.8])
    assert extend_alphas([0.9, 0.8], 4, decay=0.5) == pytest.approx([0.9, 0.8, 0.4, 0.2])
    assert extend_alphas([0.9, 0.8, 0.7], 2) == pytest.approx([0.9, 0.8])
    with pytest.raises(ValueError):
        extend_alphas([], 3)
    # measured at K=2 only, alpha 0.9, cheap drafting: the policy recommends beyond what it measured
    ch = choose_k([0.9, 0.9], StepCost(c0=10, c_draft=0.1, c_verify=0.1), k_max=6)
    assert ch.k == 6 and ch.measured_positions == 2 and ch.alphas == pytest.approx([0.9] * 6)
    # with a steep decay the extrapolated positions are not worth drafting
    assert choose_k([0.9, 0.9], StepCost(c0=10, c_draft=1, c_verify=0), k_max=6, decay=0.2).k == 2


def test_counts_of_a_simulated_process_give_back_alpha():
    """Steps accept each draft with probability alpha[j] given the earlier ones were accepted; a third of the steps
    draft fewer positions (request ends). The conditional estimate recovers alpha; the cumulative rates fed
    straight into the product would not (and would pick a smaller K)."""
    rng = random.Random(0)
    alpha = [0.9, 0.8, 0.7, 0.6]
    k = len(alpha)
    drafted, accepted = [0] * k, [0] * k
    for _ in range(20_000):
        n = k if rng.random() < 2 / 3 else rng.randint(1, k)
        acc = 0
        while acc < n and rng.random() < alpha[acc]:
            acc += 1
        for j in range(n):
            drafted[j] += 1
            accepted[j] += j < acc
    est = conditional_alphas(drafted, accepted)
    assert est == pytest.approx(alpha, abs=0.02)
    cost = StepCost(c0=10, c_draft=1.2, c_verify=0)
    assert choose_k(est, cost, k).k == choose_k(alpha, cost, k).k == 4
    naive = [a / d for a, d in zip(accepted, drafted)]
    assert choose_k(naive, cost, k).k < 4


def test_cost_from_profile():
    profile = {"config": {"k": 4},
               "no_spec": {"1_stream": {"step_ms": 30.0, "verification_ms": 28.0, "drafting_ms": 0.0}},
               "draft_model": {"1_stream": {"step_ms": 52.0, "verification_ms": 32.0, "drafting_ms": 16.0}}}
    c = cost_from_profile(profile, "draft_model")
    assert (c.c0, c.c_draft, c.c_verify) == pytest.approx((29.0, 4.0, 1.0))
    assert c(0) == 30.0 and c(4) == 52.0 and c(2) == pytest.approx(29 + 8 + 3)


# ------------------------------------------------------------------------------ the gateway's gauges (no engine)
def _spec(drafted_steps, accepted_steps, k=4):
    from lkserve.engine.types import SpecStats

    return SpecStats(num_spec_tokens=k, steps=len(drafted_steps), drafted=sum(drafted_steps),
                     accepted=sum(accepted_steps), per_step_drafted=drafted_steps, per_step_accepted=accepted_steps,
                     per_position_drafted=[sum(d > j for d in drafted_steps) for j in range(k)],
                     per_position_accepted=[sum(a > j for a in accepted_steps) for j in range(k)])


@pytest.fixture
def k_policy():
    from lkserve.gateway.spec_k import K_POLICY
    from lkserve.metrics import serving

    saved, window, current = dict(vars(K_POLICY)), serving.WINDOW_STEPS[0], serving.current_version()
    yield K_POLICY
    vars(K_POLICY).clear()
    vars(K_POLICY).update(saved)
    serving.set_window(window)
    serving.set_version(current)


def _gauges(name):
    from prometheus_client import REGISTRY

    return {s.labels.get("version"): s.value for fam in REGISTRY.collect() for s in fam.samples if s.name == name}


def test_window_keeps_the_recent_steps_and_gauges_follow(k_policy):
    from lkserve.config import EngineSettings
    from lkserve.metrics import serving

    k_policy.configure(EngineSettings(num_speculative_tokens=4, k_window_steps=100, k_min_drafted=10,
                                      step_cost_ms={"c0": 10, "c_draft": 2, "c_verify": 0}))
    v = "kpolicy-window"
    # first 100 steps: every draft accepted; then 100 steps accepting only position 0 half of the time
    for _ in range(5):
        serving.observe_spec(v, _spec([4] * 20, [4] * 20))
    assert _gauges("lkserve_spec_recommended_k")[v] == 4  # alpha 1, cost 10 + 2K: (K+1)/(10+2K) rises with K
    assert _gauges("lkserve_spec_expected_speedup")[v] == pytest.approx(5 / 18 * 10)
    for _ in range(5):
        serving.observe_spec(v, _spec([4] * 20, [1, 0] * 10))
    steps, drafted, accepted = serving.recent_position_counts(v)
    assert steps == 100 and drafted == [100] * 4 and accepted == [50, 0, 0, 0]  # the old requests left the window
    assert _gauges("lkserve_spec_recommended_k")[v] == 1
    assert _gauges("lkserve_spec_expected_speedup")[v] == pytest.approx(1.5 / 12 * 10)
    alphas = {s.labels["position"]: s.value for fam in __import__("prometheus_client").REGISTRY.collect()
              for s in fam.samples if s.name == "lkserve_spec_conditional_acceptance" and s.labels["version"] == v}
    assert alphas == {"0": 0.5, "1": 0.0, "2": 0.0, "3": 0.0}


def test_no_recommendation_below_min_drafted(k_policy):
    from lkserve.config import EngineSettings
    from lkserve.metrics import serving

    k_policy.configure(EngineSettings(num_speculative_tokens=4, k_min_drafted=50))
    serving.observe_spec("kpolicy-few", _spec([4] * 10, [4] * 10))
    assert "kpolicy-few" not in _gauges("lkserve_spec_recommended_k")
    assert _gauges("lkserve_spec_window_steps")["kpolicy-few"] == 10
    summary = k_policy.summary("kpolicy-few")
    assert summary["k"] is None and summary["window_steps"] == 10


def test_cost_for_settings(tmp_path):
    import json

    from lkserve.config import EngineSettings
    from lkserve.engine.spec_k import DEFAULT_COST_MS, cost_for

    assert cost_for(EngineSettings(method="none")) is None
    assert cost_for(EngineSettings(method="eagle3")) == DEFAULT_COST_MS["eagle3"]
    assert cost_for(EngineSettings(step_cost_ms={"c0": 1, "c_draft": 2, "c_verify": 3}))(1) == 1 + 2 + 6
    f = tmp_path / "step_cost.json"
    f.write_text(json.dumps({"config": {"k": 2}, "no_spec": {"1_stream": {"step_ms": 10, "verification_ms": 9}},
                             "draft_model": {"1_stream": {"step_ms": 16, "verification_ms": 11, "drafting_ms": 4}}}))
    c = cost_for(EngineSettings(step_cost_file=f))
    assert (c.c0, c.c_draft, c.c_verify) == pytest.approx((9.0, 2.0, 1.0)) and c(2) == 16


def test_cost_from_steps_measured_ks_and_a_line_between_them():
    prior = StepCost(c0=32.6, c_draft=0.04, c_verify=1.0)  # ngram's default: an extra position looks nearly free
    rows = [{"k": 1, "batch": 1, "steps": 40, "mean_s": 0.0676}, {"k": 4, "batch": 1, "steps": 40, "mean_s": 0.0976},
            {"k": 2, "batch": 1, "steps": 3, "mean_s": 0.5},  # too few steps: ignored
            {"k": 4, "batch": 3, "steps": 10, "mean_s": 0.2}]  # a batch size the traffic ran fewer steps at
    c = cost_from_steps(rows, prior, min_steps=20)
    assert c(1) == pytest.approx(67.6) and c(4) == pytest.approx(97.6)
    assert c(2) == pytest.approx(77.6) and c(3) == pytest.approx(87.6)  # the line through the two
    assert c(0) == pytest.approx(prior(0) * (67.6 / prior(1) + 97.6 / prior(4)) / 2)
    # step times like ngram's in bench/results/adaptive_k.json: the prior keeps K=4, the measured costs do not
    alphas = [0.4, 0.5, 0.5, 0.5]
    assert choose_k(alphas, prior, 4).k == 4
    assert choose_k(alphas, c, 4).k == 1


def test_cost_from_steps_one_k_scales_the_prior_and_nothing_measured_is_the_prior():
    prior = StepCost(c0=30.0, c_draft=2.0, c_verify=1.0)
    # one K measured: the prior's shape, scaled to it (twice as slow as the prior says)
    c = cost_from_steps([{"k": 4, "batch": 1, "steps": 25, "mean_s": 2 * prior(4) / 1000}], prior, min_steps=20)
    assert c(4) == pytest.approx(2 * prior(4)) and c(1) == pytest.approx(2 * prior(1)) and c(0) == 2 * prior(0)
    assert cost_from_steps([{"k": 4, "batch": 1, "steps": 5, "mean_s": 0.06}], prior, min_steps=20) is prior
    assert cost_from_steps([], prior) is prior
    # the most-served batch size wins, however many K it has
    rows = [{"k": 2, "batch": 4, "steps": 100, "mean_s": 0.1}, {"k": 1, "batch": 1, "steps": 30, "mean_s": 0.05},
            {"k": 2, "batch": 1, "steps": 30, "mean_s": 0.06}]
    assert set(cost_from_steps(rows, prior).measured) == {0, 2}


def _steps(ages, ms, rng, noise=0.03):
    """[age_s, seconds] steps at `ms` a step with a few % noise, one per age."""
    return [[a, ms * (1 + rng.gauss(0, noise)) / 1000] for a in ages]


def _row(k, samples):
    return {"k": k, "batch": 1, "steps": len(samples), "mean_s": sum(s for _, s in samples) / len(samples),
            "samples": samples}


def test_cost_from_steps_compares_a_probe_with_the_steps_around_it_not_the_overall_mean():
    """The contended run of bench/results/adaptive_k_online_contended.json: K=1 is 10 % cheaper than K=4 at any one
    load, but it was probed while the machine was 30 % slower, so its mean says it is dearer. Against the K=4
    steps of the same stretch of time it is 0.9x, and the policy prices it so."""
    rng = random.Random(0)
    ages = [i * 0.1 for i in range(1000)]  # 100 s of steps, newest first
    k4 = [[a, s * (1.3 if 20 <= a <= 50 else 1.0)]  # the load rose 20-50 s ago
          for a, s in _steps([a for a in ages if not 30 <= a <= 40], 100, rng)]
    k1 = _steps([a for a in ages if 30 <= a <= 40], 90 * 1.3, rng)  # the probe, 30-40 s ago
    prior = StepCost(c0=32.6, c_draft=0.04, c_verify=1.0)
    unpaired = cost_from_steps([{k: v for k, v in _row(k, s).items() if k != "samples"} for k, s in ((4, k4), (1, k1))],
                               prior)
    assert unpaired(1) > unpaired(4)  # the mean of each K on its own
    c = cost_from_steps([_row(4, k4), _row(1, k1)], prior)
    assert c(4) == pytest.approx(_row(4, k4)["mean_s"] * 1000)  # the reference: the K with the most steps
    assert c(1) / c(4) == pytest.approx(0.9, abs=0.01)
    assert 0 < c.spread[1] < 0.01 and 0 < c.spread[4] < 0.01
    r, se = paired_ratio(k1, k4, min_steps=20)
    assert r == pytest.approx(0.9, abs=0.01) and se == pytest.approx(c.spread[1])
    assert paired_ratio(k1, [s for s in k4 if s[0] < 10], min_steps=20) is None  # no reference steps near it
    alphas = [0.2, 0.2, 0.2, 0.2]
    assert choose_k(alphas, unpaired, 4).k == 4 and choose_k(alphas, c, 4).k == 1


def test_worth_moving_needs_a_gain_beyond_the_noise_of_two_measured_costs():
    alphas = [0.5, 0.5, 0.5, 0.5]
    cost = StepCost(c0=30, c_draft=1, c_verify=0, measured={0: 30.0, 3: 33.0, 4: 33.6}, spread={3: 0.02, 4: 0.02})
    choice = choose_k(alphas, cost, 4)
    gain = choice.speedup_by_k[choice.k] / choice.speedup_by_k[3] - 1
    assert choice.k == 4 and 0 < gain < 2 * (2 * 0.02 ** 2) ** 0.5  # 4 is better by less than 2 sigma
    assert not worth_moving(choice, cost, 3, sigmas=2.0)
    assert worth_moving(choice, cost, 3, sigmas=0.0)  # 0: always move
    tight = StepCost(**{**cost.__dict__, "spread": {3: 0.002, 4: 0.002}})
    assert worth_moving(choose_k(alphas, tight, 4), tight, 3, sigmas=2.0)
    # a K without a measured spread (never served): worth moving to, it gets measured
    assert worth_moving(choice, StepCost(**{**cost.__dict__, "spread": {3: 0.02}}), 3, sigmas=2.0)
    assert worth_moving(choice, cost, 4, sigmas=2.0) and worth_moving(choice, cost, None, sigmas=2.0)


def test_decode_batch_counts_decode_only_steps():
    from types import SimpleNamespace

    from lkserve.engine.vllm.spec_k import _decode_batch

    def so(counts, drafts):
        return SimpleNamespace(num_scheduled_tokens=counts, scheduled_spec_decode_tokens=drafts)

    assert _decode_batch(so({"a": 5, "b": 1}, {"a": [1, 2, 3, 4]})) == 2  # b: no draft this step (ngram, no match)
    assert _decode_batch(so({"a": 5, "b": 17}, {"a": [1, 2, 3, 4]})) == 0  # b is prefilling
    assert _decode_batch(so({}, {})) == 0
