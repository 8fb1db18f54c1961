"""The arithmetic of the benchmark scripts (the measurements themselves run from bench/, not in the suite)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sample(t, phase, version, accepted, drafted=100):
    return {"t": t, "phase": phase, "version": version, "drafts": drafted // 4, "drafted": drafted,
            "accepted": accepted, "tokens": 50, "seconds": 1.0}


def test_domain_shift_recovery_counts_requests_until_within_5pct():
    ds = _load("domain_shift")
    samples = [_sample(t, "MT-bench", "base", 10) for t in range(20)]  # 0.10 before the shift
    samples += [_sample(20 + t, "HumanEval", "v0001", 5) for t in range(10)]  # drops to 0.05
    samples += [_sample(30 + t, "HumanEval", "v0002", 10) for t in range(20)]  # back to 0.10
    out = ds.analyse({"samples": samples, "domain_shift_t": 20.0, "errors": 0}, window=10)
    assert out["acceptance_pre_shift"] == 0.1
    assert out["acceptance_just_after_shift"] == 0.05
    # windows of 10 ending at post-shift request i: (10 - j) * 0.05 + j * 0.10 >= 0.095 first at j = 9 -> i = 19
    assert out["recovery_within_5pct"]["requests_after_shift"] == 19
    assert out["per_version"]["v0001"]["acceptance_by_phase"] == {"HumanEval": 0.05}
    never = ds.analyse({"samples": samples[:30], "domain_shift_t": 20.0}, window=10)
    assert never["recovery_within_5pct"] is None


def test_adaptation_traffic_is_balanced_and_summary_compares_to_kl():
    ad = _load("adaptation")
    train = [("mtbench", [i]) for i in range(5)] + [("humaneval", [100 + i]) for i in range(50)]
    reqs = ad.traffic(train, 40, 0)
    assert len(reqs) == 40 and sum(d == "mtbench" for d, _ in reqs) == 20
    assert ad.traffic(train, 40, 0) == reqs  # seeded
    ev = {"initial": {"tau": 1.10, "acceptance_rate": 0.02, "tokens_per_s": 50.0},
          "none": {"tokens_per_s": 100.0}}
    training = {}
    for loss, tau in (("kl", 1.20), ("lk_lambda", 1.26), ("lk_alpha", 1.23), ("tv", 1.22)):
        for s, d in ((0, -0.01), (1, 0.0), (2, 0.01)):
            ev[f"{loss}-s{s}"] = {"tau": tau + d, "acceptance_rate": 0.05, "tokens_per_s": 60.0}
            training[f"{loss}-s{s}"] = {"heldout_offline": {"alpha": 0.1}}
    table = ad.summarise({"vllm_heldout": ev, "training": training, "initial_offline": {"alpha": 0.07}}, [0, 1, 2])
    assert table["lk_lambda"]["tau"]["mean"] == pytest.approx(1.26)
    assert table["lk_lambda"]["tau"]["std"] == pytest.approx(0.01)
    assert table["lk_lambda"]["tau_gain_vs_kl_pct"] == pytest.approx(5.0)
    assert table["kl"]["tau_gain_vs_initial_pct"] == pytest.approx(9.09, abs=0.01)
    assert table["initial"]["speedup_vs_none"] == 0.5


@pytest.mark.parametrize("name", ["adaptation", "domain_shift", "serving", "draft_choice", "train_speed",
                                  "bootstrap_losses"])
def test_bench_scripts_have_a_cli(name):
    proc = subprocess.run([sys.executable, "-m", "lkserve.cli", "bench", name, "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def _run(method, taus, accepted):
    samples = [_sample(30.0 * i, "MT-bench", "base", a) for i, a in enumerate(accepted)]
    held = [{"t": 30.0 * i, "heldout_tau_serving": t, "heldout_tau_candidate": t + 0.01, "steps": 4 * i}
            for i, t in enumerate(taus)]
    return {"config": {"method": method}, "requests": len(samples), "errors": 0, "samples": samples,
            "heldout": held, "worker": {"steps": 40, "versions_published": 2}}


def test_draft_choice_takes_the_higher_best_heldout_tau():
    dc = _load("draft_choice")
    model = dc.analyse(_run("draft_model", [1.05, 1.20, 1.15], [5, 10, 20]))
    head = dc.analyse(_run("eagle3", [1.00, 1.10, 1.18], [0, 5, 25]))
    assert model["best_heldout_tau"] == 1.2 and model["final_heldout_tau"] == 1.15
    assert head["best_heldout_tau"] == 1.18
    # 25 drafts per sample: served tau = 1 + accepted / drafts
    assert head["served_tau_last_2min"] == round(1 + 30 / 75, 4)
    assert [p["tau"] for p in head["served_curve"]] == [round(1 + 5 / 50, 4), 2.0]  # 60 s bins: (0, 30), (60)
    assert dc.choose({"draft_model": model, "eagle3": head})["default"] == "draft_model"
    head_wins = dc.analyse(_run("eagle3", [1.0, 1.3], [0, 5]))
    assert dc.choose({"draft_model": model, "eagle3": head_wins})["default"] == "eagle3"
    tie = dc.analyse(_run("eagle3", [1.2], [0]))
    assert dc.choose({"eagle3": tie, "draft_model": model})["default"] == "draft_model"


def _step_run(seconds: dict, calls: dict, capture: float, wall: float, tokens: int) -> dict:
    return {"timing": {"seconds": seconds, "calls": calls, "capture": capture, "idle_gaps": 0},
            "load": {"seconds": wall, "tokens": tokens, "drafted": 0, "accepted": 0, "drafts": 0},
            "cpu": {"engine_core": 0.9 * wall, "gateway": 0.01 * wall}}


def test_step_cost_split_adds_up_to_the_wall_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # step_cost imports its siblings (layout, adaptation)
    sc = _load("step_cost")
    # 10 steps in 1.0 s of wall clock: per step 20 ms draft passes + 10 ms drafting prep, 50 ms target, 5 ms
    # sampling, 2 ms capture; worker halves 95 ms; 3 ms in the engine core between worker calls
    seconds = {"drafting": 0.3, "draft_forward": 0.2, "target_forward": 0.45, "target_logits": 0.05,
               "sampling": 0.05, "execute_model": 0.55, "sample_tokens": 0.4, "between_steps": 0.03}
    calls = {"target_forward": 10, "execute_model": 11, "drafting": 10, "draft_forward": 40}
    half = lambda d: {k: v / 2 for k, v in d.items()}  # two rounds of half each
    runs = [_step_run(half(seconds), {k: v // 2 if k != "execute_model" else (5, 6)[i] for k, v in calls.items()},
                      0.01, 0.5, 10) for i in range(2)]
    s = sc.summarise(runs)
    assert s["steps"] == 10 and s["empty_worker_steps"] == 1
    assert s["step_ms"] == pytest.approx(100.0)
    assert (s["drafting_ms"], s["verification_ms"], s["sampling_ms"], s["capture_ms"]) == pytest.approx((30, 50, 5, 2))
    assert s["scheduler_ipc_overhead_ms"] == pytest.approx(100 - 30 - 50 - 5 - 2)
    split = s["overhead_split_ms"]
    assert split["runner_other"] == pytest.approx(95 - 87)  # inside the worker, outside every part
    assert split["engine_core_between_steps"] == pytest.approx(3)
    assert sum(split.values()) == pytest.approx(s["scheduler_ipc_overhead_ms"])
    assert s["draft_passes_per_step"] == 4 and s["detail_ms"]["drafting_other"] == pytest.approx(10)
    plain = _step_run({"target_forward": 0.4, "execute_model": 0.45, "sample_tokens": 0.01}, {"target_forward": 10,
                      "execute_model": 10}, 0.0, 0.5, 10)
    out = sc.results({}, {"no_spec": {1: [plain], 4: [plain]}, "draft_model": {1: runs, 4: runs}})
    assert out["draft_model"]["1_stream"]["spec_over_plain_step_ratio"] == pytest.approx(2.0)
    assert out["no_spec"]["4_streams"]["spec_over_plain_step_ratio"] == 1.0


def test_k_sweep_steps_and_policy_check():
    ks = _load("k_sweep")
    # engine steps = tokens - accepted (ngram's SpecStats.steps misses the steps that drafted nothing)
    r = ks.with_steps({"tokens": 64, "seconds": 2.0, "engine_cpu_seconds": 1.6,
                       "drafted_per_position": [40, 0], "accepted_per_position": [16, 0]})
    assert (r["steps"], r["ms_per_step"], r["cpu_ms_per_step"]) == (48, pytest.approx(41.667, abs=1e-3), 33.333)
    merged = ks.merge(ks.merge(None, r), r)
    assert merged["tokens"] == 128 and merged["steps"] == 96 and merged["round_seconds"] == [2.0, 2.0]
    none = ks.with_steps({"tokens": 64, "seconds": 2.0, "engine_cpu_seconds": 2.0})
    by_k = {"1": r, "2": ks.with_steps({"tokens": 64, "seconds": 2.4, "engine_cpu_seconds": 2.4,
                                        "drafted_per_position": [40, 40], "accepted_per_position": [16, 4]})}
    a = ks.analyse(by_k, none, 2)["cpu"]
    assert a["fastest_k"] == 1 and a["speedup_by_k"]["1"] == pytest.approx(1.25)
    # measured costs: 31.25 ms (no spec), 33.33 (K=1), 40 (K=2, 60 steps); alpha 0.4 then 0.25
    assert a["policy_from_K2"]["k"] == 1
    assert a["policy_from_K2"]["expected_speedup"] == pytest.approx(1.4 * 31.25 / 33.333, abs=1e-3)


def test_bootstrap_losses_summary_pairs_seeds():
    bl = _load("bootstrap_losses")
    run = lambda loss, seed, tau, alpha: {"loss": loss, "seed": seed, "train_seconds": 10.0,
                                          "after": {"tau": tau, "alpha_mean": alpha,
                                                    "alpha_per_position": [alpha, alpha / 2]}}
    runs = [run("lk_lambda", 0, 1.30, 0.20), run("kl", 0, 1.25, 0.18), run("lk_lambda", 1, 1.28, 0.19),
            run("kl", 1, 1.27, 0.185), run("lk_lambda", 2, 1.40, 0.25)]  # seed 2 has no KL run: not paired
    s = bl.summarise(runs, ["lk_lambda", "kl"])
    assert s["lk_lambda"]["heldout_tau"]["n"] == 3 and s["kl"]["heldout_tau"]["n"] == 2
    assert s["lk_lambda"]["heldout_tau"]["mean"] == pytest.approx((1.30 + 1.28 + 1.40) / 3)
    d = s["lk_lambda_minus_kl"]
    assert d["paired_by_seed"] == [0, 1]
    assert d["tau"]["values"] == pytest.approx([0.05, 0.01])
    assert d["tau"]["mean"] == pytest.approx(0.03) and d["tau"]["std"] == pytest.approx(0.0283, abs=1e-4)
    assert s["kl"]["alpha_per_position_mean"] == pytest.approx([0.1825, 0.09125])


def test_adaptive_k_analysis_finds_the_best_static_k_per_phase_and_the_switching_oracle():
    ak = _load("adaptive_k")

    def row(chat_rate, code_rate):  # 100 tokens per phase
        phases = {"chat": {"tokens": 100, "tokens_per_s": chat_rate, "tokens_per_cpu_s": chat_rate / 2},
                  "code": {"tokens": 100, "tokens_per_s": code_rate, "tokens_per_cpu_s": code_rate / 2}}
        phases["all"] = {"tokens": 200, "tokens_per_s": 200 / (100 / chat_rate + 100 / code_rate),
                         "tokens_per_cpu_s": 100 / (100 / chat_rate + 100 / code_rate)}
        return phases

    # K1 best on chat, K3 best on code; K2 best overall; adaptive switches
    arms = {"K1": row(10, 4), "K2": row(8, 8), "K3": row(4, 10), "adaptive": row(9.5, 9.5)}
    none = row(10, 5)
    out = ak.analyse(arms, none)["wall"]
    assert (out["chat"]["best_static"], out["code"]["best_static"], out["all"]["best_static"]) == ("K1", "K3", "K2")
    assert out["all"]["adaptive_over_best_static"] == pytest.approx(9.5 / 8, abs=1e-3)
    assert out["chat"]["adaptive_over_best_static"] == 0.95
    assert out["oracle_switching_rate"] == 10.0  # 200 tokens in 10 s + 10 s
    assert out["code"]["over_no_speculation"] == {"K1": 0.8, "K2": 1.6, "K3": 2.0, "adaptive": 1.9}
    assert ak.analyse(arms, none)["cpu"]["oracle_switching_rate"] == 5.0
