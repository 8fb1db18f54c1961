"""Adaptive K against every static K, on the same shifted traffic (issue 19): one engine per draft kind, started
at K = --k-max, serving chat (held-out MT-bench first turns) and then code (held-out HumanEval stubs) one request at
a time, once per arm: K = 1..k_max held fixed (`Engine.set_spec_k`), and `engine.adaptive_k` (starting at k_max,
re-deciding every --interval verification steps from the last --window steps, the product's policy,
lkserve/engine/spec_k.py) twice: `adaptive` prices K by the engine's own measured step times and probes an
unmeasured neighbouring K (engine.k_cost_online and k_probe, the defaults), `adaptive_prior` by the default
step-cost model alone. Both start cold: the worker forgets its step times at the arm's start, so the static arms'
steps do not inform them. T=0, so every arm emits the same tokens: only the steps they take and what a step costs
differ. Arms run in turn, their order rotated each round.

Each arm serves under a draft version of its own (the same weights swapped in under a new name; ngram, which has
no weights, takes the label alone), so the K policy's window starts empty for it, as it does for a version the
worker publishes.

Per arm and phase: tokens/s (wall clock), tokens per engine-CPU-second (less sensitive to other jobs on a shared
machine), steps, acceptance per position, and for the adaptive arms the K drafted at each request's start (and
the measured step costs at the arm's end).
`analysis`: the best static K over the whole shifted run and per phase, the adaptive arm over them, and every
arm over the same traffic served without speculation (its own engine, first, --rounds times).

Run: flock /tmp/lkserve-engine.lock .venv/bin/python bench/adaptive_k.py [--methods eagle3 draft_model ngram]
     [--draft eagle3=DIR] [--k-max 4] [--prompts 6] [--max-tokens 96] [--rounds 2] [--window 300]
     [--interval 100] > bench/results/adaptive_k.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k_sweep import engine_cpu_seconds, log, merge, with_steps

PHASES = ("chat", "code")


def phase_prompts(target: str, n: int) -> dict[str, list[list[int]]]:
    """The first n held-out prompts of each domain of the bootstrap split (never bootstrapped on)."""
    from transformers import AutoTokenizer

    from lkserve.trainer import bootstrap

    tok = AutoTokenizer.from_pretrained(target)
    _, held = bootstrap.split_prompts(bootstrap.prompt_texts(), 0.2, 0)
    chat = [t for k, t in held if k.startswith("mtbench/")][:n]
    code = [t for k, t in held if not k.startswith("mtbench/")][:n]
    return {"chat": [bootstrap.encode(tok, t, 256) for t in chat], "code": [bootstrap.encode(tok, t, 256) for t in code]}


async def serve_phase(engine, prompts, sp, tag: str, k_max: int) -> dict:
    """One request at a time (1 stream); counts as k_sweep.run_one_stream, plus the K drafted at each start."""
    import time

    tokens, drafted, accepted, ks = 0, [0] * k_max, [0] * k_max, []
    c0, t0 = engine_cpu_seconds(), time.perf_counter()
    for i, ids in enumerate(prompts):
        ks.append(engine.spec_k)
        async for ch in engine.generate(ids, sp, f"{tag}-{i}", capture=False):
            if ch.finished:
                tokens += ch.num_output_tokens
                for j in range(min(k_max, len(ch.spec.per_position_drafted) if ch.spec else 0)):
                    drafted[j] += ch.spec.per_position_drafted[j]
                    accepted[j] += ch.spec.per_position_accepted[j]
    seconds = time.perf_counter() - t0
    return with_steps({"tokens": tokens, "seconds": round(seconds, 3), "engine_cpu_seconds":
                       round(engine_cpu_seconds() - c0, 3), "drafted_per_position": drafted,
                       "accepted_per_position": accepted, "k_at_request_start": ks})


async def run_arm(engine, draft_dir: str | None, arm: str, prompts: dict, sp, args, tag: str) -> dict:
    """Swap the draft in as version `tag` (adaptive_k off for the swap), set the arm's K, serve both phases."""
    engine.settings = engine.settings.model_copy(update={"adaptive_k": False})
    if draft_dir is None:  # ngram: no weights to swap; the version label alone gives the arm a window of its own
        engine.draft_version = tag
    else:
        res = await engine.swap_draft(draft_dir, tag)
        assert res.ok, res
    adaptive = arm.startswith("adaptive")
    k = args.k_max if adaptive else int(arm[1:])
    assert (await engine.set_spec_k(k))["ok"]
    if adaptive:
        await engine.refresh_step_cost(reset=True)  # cold: no step times from the arms before
    engine.settings = engine.settings.model_copy(update={"adaptive_k": adaptive, "k_cost_online": arm == "adaptive"})
    out = {p: await serve_phase(engine, prompts[p], sp, f"{tag}-{p}", args.k_max) for p in PHASES}
    if engine._k_task is not None:  # a decision still in flight belongs to this arm
        await engine._k_task
    if adaptive:
        cost = await engine.refresh_step_cost()
        out["step_cost_ms"] = {str(k): round(ms, 2) for k, ms in sorted(cost.measured.items())}
        out["step_cost_spread"] = {str(k): round(se, 4) for k, se in sorted(cost.spread.items())}
    engine.settings = engine.settings.model_copy(update={"adaptive_k": False})
    return out


async def sweep(method: str, draft_dir: Path | None, target_dir: Path, prompts: dict, args) -> dict:
    from lkserve.config import CaptureSettings, EngineSettings
    from lkserve.engine.engine import Engine, sampling_params
    from lkserve.metrics import serving

    serving.set_window(args.window)
    settings = EngineSettings(target_model=str(target_dir), draft_model=draft_dir and str(draft_dir), method=method,
                              num_speculative_tokens=args.k_max, k_window_steps=args.window,
                              k_interval_steps=args.interval)  # serve's defaults otherwise
    engine = await Engine.create(settings, CaptureSettings(enabled=False), in_process=True)
    arms = [f"K{k}" for k in range(1, args.k_max + 1)] + ["adaptive", "adaptive_prior"]
    sp = sampling_params(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, dict] = {}
    try:
        await serve_phase(engine, prompts["chat"][:1], sampling_params(max_tokens=8, temperature=0.0), "warm",
                          args.k_max)
        for rnd in range(args.rounds):
            for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                r = await run_arm(engine, draft_dir and str(draft_dir), arm, prompts, sp, args,
                                  f"{method}-{arm}-r{rnd}")
                log(method, arm, f"round {rnd}", {p: (r[p]["tokens_per_s"], r[p]["k_at_request_start"])
                                                  for p in PHASES})
                acc = out.setdefault(arm, {})
                if "step_cost_ms" in r:
                    acc.setdefault("step_cost_ms_by_round", []).append(r["step_cost_ms"])
                    acc.setdefault("step_cost_spread_by_round", []).append(r["step_cost_spread"])
                for p in PHASES:
                    ks = acc.get(p, {}).get("k_at_request_start", []) + r[p]["k_at_request_start"]
                    acc[p] = {**merge(acc.get(p), r[p]), "k_at_request_start": ks}
        for arm, phases in out.items():
            both = merge(merge(None, phases["chat"]), phases["code"])
            phases["all"] = {k: v for k, v in both.items() if k != "round_seconds"}
        return out
    finally:
        await engine.shutdown()


async def no_speculation(target_dir: Path, prompts: dict, args) -> dict:
    """The same traffic without speculation, args.rounds times (the baseline every arm's speedup is over)."""
    from lkserve.config import CaptureSettings, EngineSettings
    from lkserve.engine.engine import Engine, sampling_params

    engine = await Engine.create(EngineSettings(target_model=str(target_dir), method="none"),
                                 CaptureSettings(enabled=False), in_process=True)
    sp = sampling_params(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, dict] = {}
    try:
        await serve_phase(engine, prompts["chat"][:1], sampling_params(max_tokens=8, temperature=0.0), "warm", 1)
        for rnd in range(args.rounds):
            for p in PHASES:
                r = await serve_phase(engine, prompts[p], sp, f"none-{p}-r{rnd}", 1)
                out[p] = merge(out.get(p), r)
            log("none", f"round {rnd}", {p: out[p]["tokens_per_s"] for p in PHASES})
        both = merge(merge(None, out["chat"]), out["code"])
        out["all"] = {k: v for k, v in both.items() if k != "round_seconds"}
        return out
    finally:
        await engine.shutdown()


def analyse(arms: dict, none: dict | None = None) -> dict:
    """Per basis (wall tokens/s; tokens per engine-CPU-second): best static K overall and per phase, the oracle
    that switches to each phase's best K at the shift, and the adaptive arm over the best static K."""
    out = {}
    for basis, key in (("wall", "tokens_per_s"), ("cpu", "tokens_per_cpu_s")):
        static = {a: r for a, r in arms.items() if not a.startswith("adaptive")}
        b = {}
        for p in (*PHASES, "all"):
            best = max(static, key=lambda a: static[a][p][key])
            b[p] = {"best_static": best, "best_static_rate": static[best][p][key],
                    "rate_by_arm": {a: r[p][key] for a, r in arms.items()}}
            for a in arms:
                if a.startswith("adaptive"):
                    b[p][f"{a}_over_best_static"] = round(arms[a][p][key] / static[best][p][key], 3)
            if none is not None:
                b[p]["over_no_speculation"] = {a: round(r[p][key] / none[p][key], 3) for a, r in arms.items()}
        # seconds if each phase ran at its own best static K (what no single static K can do)
        oracle_s = sum(static[b[p]["best_static"]][p]["tokens"] / static[b[p]["best_static"]][p][key]
                       for p in PHASES)
        b["oracle_switching_rate"] = round(arms[b["all"]["best_static"]]["all"]["tokens"] / oracle_s, 2)
        out[basis] = b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["eagle3"], choices=["draft_model", "eagle3", "ngram"])
    ap.add_argument("--draft", action="append", default=[], metavar="KIND=DIR",
                    help="serve this draft for KIND (e.g. a bootstrapped version) instead of the demo's bootstrap")
    ap.add_argument("--k-max", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=6, help="per phase")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=int, default=300, help="engine.k_window_steps")
    ap.add_argument("--interval", type=int, default=100, help="engine.k_interval_steps")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without speculation")
    ap.add_argument("--out", help="also write the JSON here after each method")
    args = ap.parse_args()
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    from lkserve.config import EngineSettings, default_cache_dir
    from lkserve.engine.spec_k import cost_for
    from lkserve.models.prepare import prepare_default_models

    cache = default_cache_dir()
    target_dir, _ = prepare_default_models(cache)
    given = dict(d.split("=", 1) for d in args.draft)
    prompts = phase_prompts(str(target_dir), args.prompts)
    defaults = EngineSettings()
    out = {"config": {"target": target_dir.name, "k_max": args.k_max, "prompts_per_phase": args.prompts,
                      "max_tokens": args.max_tokens, "temperature": 0.0, "streams": 1, "rounds": args.rounds,
                      "phases": "chat (held-out MT-bench first turns), then code (held-out HumanEval stubs)",
                      "k_window_steps": args.window, "k_interval_steps": args.interval,
                      "k_min_drafted": defaults.k_min_drafted, "k_cost_min_steps": defaults.k_cost_min_steps,
                      "k_cost_max_age_s": defaults.k_cost_max_age_s, "dtype": defaults.dtype, "layout": defaults.layout,
                      "enforce_eager": defaults.enforce_eager, "capture": False, "drafts": {}, "step_cost_ms": {}},
           "methods": {}}
    none = None
    if not args.no_baseline:
        none = asyncio.run(no_speculation(target_dir, prompts, args))
        out["methods"]["none"] = {"arms": {"none": none}}
    for method in args.methods:
        draft = Path(os.path.expanduser(given[method])) if method in given else None
        if draft is None and method != "ngram":
            boots = sorted((cache / "demo" / "bootstrap").glob(f"{method}-*/drafts/v0001"))
            if not boots:
                sys.exit(f"no bootstrapped {method} draft in {cache}/demo/bootstrap: run `lkserve demo` once or "
                         f"pass --draft {method}=DIR")
            draft = boots[-1]
        cost = cost_for(EngineSettings(method=method, draft_model=draft and str(draft), target_model=str(target_dir)))
        out["config"]["drafts"][method] = draft and str(draft)
        out["config"]["step_cost_ms"][method] = {"c0": cost.c0, "c_draft": cost.c_draft, "c_verify": cost.c_verify}
        arms = asyncio.run(sweep(method, draft, target_dir, prompts, args))
        out["methods"][method] = {"arms": arms, "analysis": analyse(arms, none)}
        if args.out:  # what is done so far survives a timeout
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1), file=json_out)


if __name__ == "__main__":
    main()
