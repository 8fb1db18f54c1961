"""K by measurement: one engine per method started at K = --k-max, then K = 1..k_max applied at run time
(`Engine.set_spec_k`, the same path engine.adaptive_k uses), the same prompts at each K. JSON out.

Per K: tokens/s (1 stream, wall clock), engine steps, ms per step (wall / steps), acceptance per position. Then
the K policy (lkserve/engine/spec_k.py) is checked against the sweep: with the measured ms per step as its cost
model, from the conditional alphas measured at K = k_max (all positions measured) and at K = 1 (positions 2.. held
at alpha_1), which K does it pick, and which K was fastest?

Run: flock /tmp/lkserve-engine.lock .venv/bin/python bench/k_sweep.py [--k-max 6] [--prompts 6] [--max-tokens 48]
     [--methods none ngram draft_model eagle3] > bench/results/k_sweep.json
     .venv/bin/python bench/k_sweep.py --reanalyse bench/results/k_sweep.json   # recompute steps and analysis
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import heldout_prompts  # the bootstrap split's held-out prompts, never bootstrapped on


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


async def run_one_stream(engine, prompts, sp, tag: str, k_max: int) -> dict:
    tokens = 0
    drafted, accepted = [0] * k_max, [0] * k_max
    c0 = engine_cpu_seconds()
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        async for ch in engine.generate(ids, sp, f"ksweep-{tag}-{i}", capture=False):
            if ch.finished:
                tokens += ch.num_output_tokens
                s = ch.spec
                if s is not None:
                    for j in range(min(k_max, len(s.per_position_drafted))):
                        drafted[j] += s.per_position_drafted[j]
                        accepted[j] += s.per_position_accepted[j]
    seconds = time.perf_counter() - t0
    out = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
           "engine_cpu_seconds": round(engine_cpu_seconds() - c0, 3)}
    if any(drafted):
        out.update(drafted_per_position=drafted, accepted_per_position=accepted)
    return with_steps(out)


def merge(acc: dict | None, r: dict) -> dict:
    """Sum two rounds' counts; keep each round's seconds."""
    if acc is None:
        return {**r, "round_seconds": [r["seconds"]]}
    out = {"tokens": acc["tokens"] + r["tokens"], "seconds": round(acc["seconds"] + r["seconds"], 3),
           "round_seconds": acc["round_seconds"] + [r["seconds"]],
           "engine_cpu_seconds": round(acc.get("engine_cpu_seconds", 0) + r.get("engine_cpu_seconds", 0), 3)}
    out["tokens_per_s"] = round(out["tokens"] / out["seconds"], 2)
    if "drafted_per_position" in r:
        out["drafted_per_position"] = [a + b for a, b in zip(acc["drafted_per_position"], r["drafted_per_position"])]
        out["accepted_per_position"] = [a + b for a, b in zip(acc["accepted_per_position"],
                                                               r["accepted_per_position"])]
    return with_steps(out)


def engine_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's children: the engine core, with the worker inside it. On a
    busy machine wall time measures the other jobs too; CPU time of a single-threaded engine
    (VLLM_CPU_OMP_THREADS_BIND=<one core>: no OpenMP thread spin-waiting on a preempted peer) much less so."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def with_steps(r: dict) -> dict:
    """Engine steps = tokens - accepted drafts (every step, the prefill included, emits one token of its own plus
    the drafts it accepted; SpecStats.steps counts only steps that drafted, which ngram often does not)."""
    steps = r["tokens"] - sum(r.get("accepted_per_position", ()))
    out = {**r, "tokens_per_s": round(r["tokens"] / r["seconds"], 2), "steps": steps, "ms_per_step": round(1000 * r["seconds"] / max(steps, 1), 3),
           "tokens_per_step": round(r["tokens"] / max(steps, 1), 3)}
    if "engine_cpu_seconds" in r:
        out["cpu_ms_per_step"] = round(1000 * r["engine_cpu_seconds"] / max(steps, 1), 3)
        out["tokens_per_cpu_s"] = round(r["tokens"] / max(r["engine_cpu_seconds"], 1e-9), 2)
    return out


async def sweep(method: str, args, target_dir, draft_dir) -> dict:
    from lkserve.config import CaptureSettings, EngineSettings
    from lkserve.engine.engine import Engine, sampling_params

    settings = EngineSettings(target_model=str(target_dir), draft_model=str(draft_dir) if draft_dir else None,
                              method=method, num_speculative_tokens=args.k_max)  # serve's defaults otherwise
    engine = await Engine.create(settings, CaptureSettings(enabled=False), in_process=True)
    try:
        prompts = heldout_prompts(str(target_dir), args.prompts)
        sp = sampling_params(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        await run_one_stream(engine, prompts[:1], sampling_params(max_tokens=8, temperature=0.0), "warm", args.k_max)
        ks = [0] if method == "none" else list(range(1, args.k_max + 1))
        out: dict[str, dict] = {}
        for rnd in range(args.rounds):  # rounds interleave the Ks: slow phases of a busy machine hit all of them
            for k in ks:
                if k:
                    res = await engine.set_spec_k(k)
                    assert res["ok"], res
                r = await run_one_stream(engine, prompts, sp, f"{method}-{k}-{rnd}", args.k_max)
                assert all(d == 0 for d in r.get("drafted_per_position", [0] * args.k_max)[k:]), r
                log(method, f"K={k} round {rnd}", r)
                out[str(k)] = merge(out.get(str(k)), r)
        return out
    finally:
        await engine.shutdown()


def analyse(by_k: dict, none: dict, k_max: int) -> dict:
    """Per basis (wall clock; engine CPU time): the fastest K, speedups, step-cost ratios, and the K policy's
    choice with the measured ms per step as its cost model, from the alphas measured at K=k_max and at K=1."""
    from lkserve.engine.spec_k import StepCost, choose_k_from_counts

    out = {}
    for basis, step_key, rate_key in (("wall", "ms_per_step", "tokens_per_s"),
                                      ("cpu", "cpu_ms_per_step", "tokens_per_cpu_s")):
        if step_key not in none:
            continue
        measured = {0: none[step_key], **{int(k): r[step_key] for k, r in by_k.items()}}
        cost = StepCost(0.0, 0.0, 0.0, measured=measured)
        fastest = max(by_k, key=lambda k: by_k[k][rate_key])
        b = {"fastest_k": int(fastest),
             "fastest_speedup": round(by_k[fastest][rate_key] / none[rate_key], 3),
             "speedup_by_k": {k: round(r[rate_key] / none[rate_key], 3) for k, r in by_k.items()},
             "step_over_plain_by_k": {k: round(r[step_key] / none[step_key], 3) for k, r in by_k.items()}}
        for at in (str(k_max), "1"):
            r = by_k.get(at, {})
            if "drafted_per_position" not in r:
                continue
            ch = choose_k_from_counts(r["drafted_per_position"], r["accepted_per_position"], cost, k_max,
                                      min_drafted=20)
            if ch is not None:
                b[f"policy_from_K{at}"] = {
                    "k": ch.k, "expected_speedup": round(ch.speedup, 3), "alphas": [round(a, 3) for a in ch.alphas],
                    "measured_positions": ch.measured_positions,
                    "expected_speedup_by_k": {k: round(v, 3) for k, v in ch.speedup_by_k.items()}}
        out[basis] = b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k-max", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=["none", "ngram", "draft_model", "eagle3"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--draft", action="append", default=[], metavar="KIND=DIR",
                    help="sweep this draft directory for KIND (e.g. a bootstrapped version) instead of the untrained one")
    ap.add_argument("--out", help="also write the JSON here after each method")
    ap.add_argument("--reanalyse", help="a k_sweep JSON: recompute steps and the analysis from its raw counts")
    args = ap.parse_args()
    if args.reanalyse:
        with open(args.reanalyse) as f:
            out = json.load(f)
        out["methods"] = {m: {k: with_steps(r) for k, r in by_k.items()} for m, by_k in out["methods"].items()}
        add_analysis(out, out["config"]["k_max"])
        print(json.dumps(out, indent=1))
        return
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1

    from lkserve.config import EngineSettings, default_cache_dir
    from lkserve.models.prepare import prepare_default_models

    cache = default_cache_dir()
    target_dir, draft_dir = prepare_default_models(cache)
    defaults = EngineSettings()
    given = dict(d.split("=", 1) for d in args.draft)
    out = {"config": {"target": target_dir.name, "k_max": args.k_max, "prompts": args.prompts,
                      "max_tokens": args.max_tokens, "temperature": 0.0, "streams": 1, "dtype": defaults.dtype,
                      "layout": defaults.layout, "enforce_eager": defaults.enforce_eager, "capture": False,
                      "rounds": args.rounds,
                      "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "unset (auto)"),
                      "prompt_set": "held-out split of lkserve.trainer.bootstrap (never bootstrapped on): MT-bench "
                                    "first turns (chat) and HumanEval stubs, alternating",
                      "k_applied": "at run time, Engine.set_spec_k (one engine per method, started at k_max)"},
           "methods": {}}
    for method in args.methods:
        draft = None
        if method in given:
            draft = Path(os.path.expanduser(given[method]))
        elif method == "draft_model":
            draft = draft_dir
        elif method == "eagle3":
            draft = prepare_default_models(cache, method="eagle3")[1]
        if draft is not None:
            out["config"].setdefault("drafts", {})[method] = str(draft)
        out["methods"][method] = asyncio.run(sweep(method, args, target_dir, draft))
        if args.out:  # what is done so far survives a timeout
            add_analysis(out, args.k_max)
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    add_analysis(out, args.k_max)
    print(json.dumps(out, indent=1), file=json_out)


def add_analysis(out: dict, k_max: int) -> None:
    none = out["methods"].get("none", {}).get("0")
    if none:
        out["analysis"] = {m: analyse(r, none, k_max) for m, r in out["methods"].items() if m != "none"}


if __name__ == "__main__":
    main()
