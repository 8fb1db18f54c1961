"""Where a speculative step's time goes: per-part step cost of no speculation, ngram, draft model, EAGLE-3. JSON out.

One engine per method, all four up at once in the layout `lkserve serve` runs (`engine.layout=in_process`: this
process holds vLLM's AsyncLLM, as the gateway does; the EngineCore is a child process with the worker inside it;
capture on, into an embedded Redis, as serve's default), bf16 SmolLM2-135M-Instruct target, K draft tokens, T=0.
The engines take turns (`--rounds`, the order rotating) on held-out MT-bench / HumanEval prompts (bench/adaptation.py's
split, prompts never reused, so no prefix-cache hits): at 1 stream (`--requests-1` one after the other) and at 4
streams (4 at once). The HTTP gateway itself is not in the loop.

The engine cores run with LKSERVE_STEP_TIMING=1 (lkserve/engine/vllm/timing.py): wall seconds per part of each
worker step come back through `lkserve_info()["step_timing"]`; capture's own time is its `hook_seconds`. Per step:

    drafting       propose_draft_token_ids: the K draft passes (draft_forward, draft_passes_per_step; the draft's LM
                   head, draft_logits) and their preparation and sampling (drafting_other)
    verification   the target's forward + LM head over the scheduled (verified) tokens
    sampling       sampler / draft probabilities + rejection sampler
    capture        lkserve's capture hooks
    overhead       wall step time minus the parts: runner bookkeeping and input preparation inside the worker
                   (runner_other), the engine core outside the worker (scheduler, outputs to this process, its busy
                   loop: engine_core_between_steps) and whatever else the wall clock saw (the rest, e.g. request
                   arrival / finish)

The wall step time is the load's wall clock over the engine steps it took. CPU seconds per process (/proc, the
helpers of bench/layout.py): this process (AsyncLLM: output processing, detokenisation), the loaded engine's
EngineCore, the other engines' idle cores, redis-server. spec_over_plain_step_ratio: a method's wall step time over
no_spec's, same streams, same run.

Run (it starts vLLM engines): flock /tmp/lkserve-engine.lock timeout 900 .venv/bin/python bench/step_cost.py
Writes bench/results/step_cost.json (and prints the same JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from adaptation import split_prompts
from engine import serve_batch
from layout import cpu_seconds, tree

RESULTS = Path(__file__).resolve().parent / "results" / "step_cost.json"
METHODS = {"no_spec": "none", "ngram": "ngram", "draft_model": "draft_model", "eagle3": "eagle3"}
PARTS = ("drafting", "verification", "sampling", "capture")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ measurement
def burn() -> None:
    """A stand-in for another job on the machine (the training worker, a test run): one core of pure Python."""
    while True:
        pass


async def snapshot(engine) -> dict:
    info = await engine.info()
    t = info["step_timing"] or {"seconds": {}, "calls": {}, "idle_gaps": 0}
    return {"seconds": dict(t["seconds"]), "calls": dict(t["calls"]), "idle_gaps": t["idle_gaps"],
            "capture": float((info.get("capture") or {}).get("hook_seconds", 0.0)), "pid": info["pid"],
            "torch_threads": t.get("torch_threads")}


def delta(after: dict, before: dict) -> dict:
    keys = set(after["seconds"]) | set(after["calls"])
    return {"seconds": {k: after["seconds"].get(k, 0.0) - before["seconds"].get(k, 0.0) for k in keys},
            "calls": {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in keys},
            "capture": after["capture"] - before["capture"], "idle_gaps": after["idle_gaps"] - before["idle_gaps"]}


def cpu_by_process(pids: dict[int, str]) -> dict[int, float]:
    return {p: c for p in pids if (c := cpu_seconds(p)) is not None}


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat: user + nice + system + irq + softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> list[dict]:
    """The threads of a process: name, CPU seconds, the cores it may run on (how vLLM bound its OpenMP threads)."""
    out = []
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            f = stat.rsplit(")", 1)[1].split()
            cores = sorted(os.sched_getaffinity(tid))
        except OSError:
            continue
        out.append({"tid": tid, "name": name, "cpu_seconds": round((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"),
                                                                   2), "cores": cores})
    return out


async def run_load(engine, prompts: list[list[int]], concurrency: int, max_tokens: int, tag: str) -> dict:
    """T=0 with capture on (serve's default): tokens, drafted, accepted, drafts, seconds."""
    from lkserve.engine.vllm import sampling_params

    sp = sampling_params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tot = await serve_batch(engine, prompts, sp, concurrency, tag, capture=True)
    return {k: tot[k] for k in ("tokens", "drafted", "accepted", "drafts", "seconds")}


async def measure(engine, pids: dict[int, str], core_pid: int, prompts, concurrency, max_tokens, tag,
                  burners: set[int]) -> dict:
    """One load on one engine: its timing delta, wall clock and CPU seconds per process."""
    before, cpu0, busy0 = await snapshot(engine), cpu_by_process(pids), machine_busy_seconds()
    load = await run_load(engine, prompts, concurrency, max_tokens, tag)
    after, cpu1, busy1 = await snapshot(engine), cpu_by_process(pids), machine_busy_seconds()
    cpu = {}
    for p, name in pids.items():
        if p in cpu0 and p in cpu1:
            role = "gateway" if p == os.getpid() else "engine_core" if p == core_pid else \
                "burner" if p in burners else "other_engine_cores_idle" if "EngineCore" in name else name
            cpu[role] = cpu.get(role, 0.0) + cpu1[p] - cpu0[p]
    # other jobs on this shared machine while the load ran (the whole machine's busy time minus this bench's)
    cpu["other_jobs_on_the_machine"] = max(busy1 - busy0 - sum(cpu.values()), 0.0)
    return {"timing": delta(after, before), "load": load, "cpu": cpu}


def summarise(runs: list[dict]) -> dict:
    """Per-step split (ms) over the loads of one method and concurrency (summed over rounds)."""
    s, c = {}, {}
    capture = wall = 0.0
    tokens = drafted = accepted = drafts = 0
    cpu: dict[str, float] = {}
    for r in runs:
        t = r["timing"]
        for k, v in t["seconds"].items():
            s[k] = s.get(k, 0.0) + v
        for k, v in t["calls"].items():
            c[k] = c.get(k, 0) + v
        capture += t["capture"]
        wall += r["load"]["seconds"]
        tokens += r["load"]["tokens"]
        drafted, accepted, drafts = (drafted + r["load"]["drafted"], accepted + r["load"]["accepted"],
                                     drafts + r["load"]["drafts"])
        for k, v in r["cpu"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    steps = max(c.get("target_forward", 0), 1)  # worker steps that ran the target (not the empty ones)
    ms = lambda x: round(1000 * x / steps, 3)
    parts = {"drafting": s.get("drafting", 0.0),
             "verification": s.get("target_forward", 0.0) + s.get("target_logits", 0.0),
             "sampling": s.get("sampling", 0.0), "capture": capture}
    worker = s.get("execute_model", 0.0) + s.get("sample_tokens", 0.0)
    between = s.get("between_steps", 0.0)
    runner_other = worker - sum(parts.values())
    overhead = wall - sum(parts.values())
    out = {
        "steps": steps, "empty_worker_steps": c.get("execute_model", 0) - c.get("target_forward", 0), "tokens": tokens, "tokens_per_step": round(tokens / steps, 3),
        "tokens_per_s": round(tokens / wall, 1), "wall_seconds": round(wall, 2),
        "step_ms": round(1000 * wall / steps, 3),
        **{f"{k}_ms": ms(v) for k, v in parts.items()},
        "scheduler_ipc_overhead_ms": ms(overhead),
        "overhead_split_ms": {"runner_other": ms(runner_other), "engine_core_between_steps": ms(between),
                              "rest": ms(overhead - runner_other - between)},
        "detail_ms": {"target_forward": ms(s.get("target_forward", 0.0)),
                      "target_logits": ms(s.get("target_logits", 0.0)),
                      "draft_forward": ms(s.get("draft_forward", 0.0)),
                      "draft_logits": ms(s.get("draft_logits", 0.0)),
                      "drafting_other": ms(s.get("drafting", 0.0) - s.get("draft_forward", 0.0)
                                           - s.get("draft_logits", 0.0)),
                      "worker_execute_model": ms(s.get("execute_model", 0.0)),
                      "worker_sample_tokens": ms(s.get("sample_tokens", 0.0))},
        "draft_passes_per_step": round(c.get("draft_forward", 0) / steps, 3),
        "fraction_of_step": {k: round(v / wall, 3) for k, v in {**parts, "overhead": overhead}.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in sorted(cpu.items())},
        "cpu_seconds_per_wall_second": {k: round(v / wall, 3) for k, v in sorted(cpu.items())},
        "idle_gaps": sum(r["timing"]["idle_gaps"] for r in runs),
    }
    if drafted:
        out.update(drafted=drafted, accepted=accepted, acceptance_rate=round(accepted / drafted, 4),
                   tau=round(1 + accepted / max(drafts, 1), 3))
    out["rounds_step_ms"] = [round(1000 * r["load"]["seconds"] / max(r["timing"]["calls"].get("target_forward", 0), 1),
                                   3) for r in runs]
    return out


# ------------------------------------------------------------------------------------------------ main
def results(config: dict, runs: dict) -> dict:
    result: dict = {"config": config}
    for name, by_conc in runs.items():
        if by_conc[1] and by_conc[4]:
            result[name] = {"1_stream": summarise(by_conc[1]), "4_streams": summarise(by_conc[4])}
    for name in runs:
        for key in ("1_stream", "4_streams"):
            plain, mine = result.get("no_spec", {}).get(key), result.get(name, {}).get(key)
            if plain and mine:
                mine["spec_over_plain_step_ratio"] = round(mine["step_ms"] / plain["step_ms"], 3)
                mine["tokens_per_s_over_plain"] = round(mine["tokens_per_s"] / plain["tokens_per_s"], 3)
    return result


async def run(args) -> dict:
    from lkserve.capture.embedded_redis import EmbeddedRedis
    from lkserve.capture.sink import redis_sink_spec
    from lkserve.config import CaptureSettings, EngineSettings, RedisSettings, default_cache_dir
    from lkserve.engine.engine import Engine
    from lkserve.models.prepare import prepare_default_models

    target, draft = prepare_default_models(default_cache_dir())
    _, head = prepare_default_models(default_cache_dir(), method="eagle3")
    drafts = {"draft_model": str(draft), "eagle3": str(head)}
    capture = CaptureSettings(enabled=args.capture == "on")
    workdir = Path(tempfile.mkdtemp(prefix="lkserve-bench-step-cost-"))
    config = {"layout": "in_process (lkserve serve's default: AsyncLLM in this process, EngineCore a child process "
                        "with the worker inside; no HTTP gateway in the loop)",
              "k": args.k, "dtype": "bfloat16", "enforce_eager": True, "temperature": 0.0,
              "max_tokens": args.max_tokens, "target": Path(target).name,
              "drafts": {"draft_model": Path(draft).name, "eagle3": Path(head).name, "ngram": "prompt_lookup 1-4"},
              "draft_sample_method": "probabilistic", "capture": f"{args.capture} (Redis sink, embedded)",
              "prompts": f"held-out MT-bench first turns (chat template) and HumanEval stubs (bench/adaptation.py "
                         f"split, seed 0); per round {args.requests_1} at 1 stream, {args.requests_4} at 4 streams, "
                         "none reused",
              "rounds": args.rounds, "device": "cpu",
              "burn_processes": args.burn,
              "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "unset (auto)"), "cpu_cores": os.cpu_count(),
              "command": " ".join(["bench/step_cost.py", *sys.argv[1:]])}
    engines: dict[str, Engine] = {}
    burners: list = []
    with EmbeddedRedis(workdir / "redis") as redis_server:
        sink = redis_sink_spec(redis_server.url, RedisSettings(), capture) if args.capture == "on" else None
        try:
            for name in args.methods:
                method = METHODS[name]
                settings = EngineSettings(target_model=str(target), draft_model=drafts.get(name), method=method,
                                          num_speculative_tokens=args.k, dtype="bfloat16", max_model_len=2048,
                                          max_num_seqs=8, seed=0)
                log(f"{name}: starting the engine ...")
                engines[name] = await Engine.create(settings, capture, sink)
                log(f"{name}: up in {engines[name].start_seconds:.1f}s (layout {engines[name].layout})")
            tok = next(iter(engines.values())).tokenizer
            _, held = split_prompts(tok, seed=0, heldout=16)
            mt = [ids for d, ids in held if d == "mtbench"]
            he = [ids for d, ids in held if d == "humaneval"]
            per_round = (args.requests_1 + args.requests_4) // 2
            if per_round * args.rounds > min(len(mt), len(he)):
                raise SystemExit(f"{args.rounds} rounds need {per_round * args.rounds} held-out prompts per set")
            core = {name: (await engines[name].info())["pid"] for name in engines}
            config["engine_core_torch_threads"] = {name: (await snapshot(e))["torch_threads"]
                                                   for name, e in engines.items()}
            for name, e in engines.items():  # warm-up: one-off costs of the first steps
                await run_load(e, [mt[-1], he[-1]], 2, 8, f"warm-{name}")
            for _ in range(args.burn):
                burners.append(multiprocessing.get_context("spawn").Process(target=burn, daemon=True))
                burners[-1].start()
            runs = {name: {1: [], 4: []} for name in engines}
            for r in range(args.rounds):
                a = r * per_round
                mix = [x for pair in zip(mt[a: a + per_round], he[a: a + per_round]) for x in pair]
                order = list(engines)[r % len(engines):] + list(engines)[: r % len(engines)]
                for name in order:
                    pids = tree(os.getpid())
                    for conc, prompts in ((1, mix[: args.requests_1]), (4, mix[args.requests_1:])):
                        await asyncio.sleep(args.settle_seconds)
                        m = await measure(engines[name], pids, core[name], prompts, conc, args.max_tokens,
                                          f"r{r}-{name}-c{conc}", {b.pid for b in burners})
                        runs[name][conc].append(m)
                        steps = m["timing"]["calls"].get("target_forward", 0)
                        log(f"round {r} {name} c={conc}: {m['load']['tokens']} tokens in {m['load']['seconds']:.2f}s, "
                            f"{steps} steps, {1000 * m['load']['seconds'] / max(steps, 1):.1f} ms/step, "
                            f"other jobs {m['cpu']['other_jobs_on_the_machine']:.1f} CPU-s")
                if not args.no_write:  # a run cut short keeps its finished rounds
                    config["rounds_done"] = r + 1
                    Path(args.out).write_text(json.dumps(results(config, runs), indent=1) + "\n")
            core_threads = {name: threads(pid) for name, pid in core.items()}  # who did the work, bound where
        finally:
            for b in burners:
                b.terminate()
            for e in engines.values():
                await e.shutdown()
    config["engine_core_threads"] = {
        name: [t for t in ts if t["cpu_seconds"] > 0.05 or len(t["cores"]) < (os.cpu_count() or 1)]
        for name, ts in core_threads.items()}
    return results(config, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-1", type=int, default=2, help="requests per round at 1 stream (even)")
    ap.add_argument("--requests-4", type=int, default=4, help="requests per round at 4 streams (even)")
    ap.add_argument("--settle-seconds", type=float, default=1.0, help="pause before each load")
    ap.add_argument("--capture", choices=["on", "off"], default="on", help="serve's default is on")
    ap.add_argument("--omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND for the engine cores (e.g. 1: one "
                    "thread on core 1); default: unset, vLLM's auto, what serve runs")
    ap.add_argument("--burn", type=int, default=0, help="processes spinning a core each while measuring (contention)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["LKSERVE_STEP_TIMING"] = "1"  # read by every engine core spawned from here
    if args.omp_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    t0 = time.perf_counter()
    out = asyncio.run(run(args))
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_write:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), file=json_out)


if __name__ == "__main__":
    main()
