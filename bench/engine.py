"""Decode speed of the engine on the default model: no speculation vs the initial draft vs vLLM's ngram. JSON out.

For each method, one vLLM engine (in-process, eager, bf16 SmolLM2-135M-Instruct target) serves the same MT-bench
first turns (chat template) at each temperature and concurrency; we report output tokens/s (wall clock, all
requests of the batch), and for speculative methods drafted/accepted tokens, acceptance rate and
tau = 1 + accepted / drafts (vLLM's definition; drafts = verification steps that drafted).

Run: .venv/bin/python bench/engine.py [--prompts 12] [--max-tokens 96] [--concurrency 1 4] [--temperatures 0 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


async def serve_batch(engine, prompts, sp, concurrency: int, tag: str, capture: bool = False) -> dict:
    """All prompts through lkserve's Engine, `concurrency` at a time: output tokens, wall seconds, and the summed
    speculative stats (drafted, accepted, drafts = verification steps, per-position drafted / accepted)."""
    sem = asyncio.Semaphore(concurrency)
    tot = {"tokens": 0, "drafted": 0, "accepted": 0, "drafts": 0, "pos_drafted": [], "pos_accepted": []}

    def add(into: list, values) -> None:
        into.extend([0] * (len(values) - len(into)))
        for j, v in enumerate(values):
            into[j] += v

    async def one(i, ids):
        async with sem:
            async for ch in engine.generate(ids, sp, f"{tag}-{i}", capture=capture):
                if ch.finished:
                    tot["tokens"] += ch.num_output_tokens
                    if ch.spec is not None:
                        tot["drafted"] += ch.spec.drafted
                        tot["accepted"] += ch.spec.accepted
                        tot["drafts"] += ch.spec.steps
                        add(tot["pos_drafted"], ch.spec.per_position_drafted)
                        add(tot["pos_accepted"], ch.spec.per_position_accepted)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return {**tot, "seconds": time.perf_counter() - t0}


async def run_batch(engine, prompts, sp, concurrency: int) -> dict:
    """All prompts, `concurrency` at a time; tokens/s over the whole batch."""
    totals = await serve_batch(engine, prompts, sp, concurrency, f"bench-{concurrency}-{sp.temperature}")
    seconds = totals["seconds"]
    out = {"tokens": totals["tokens"], "seconds": round(seconds, 2),
           "tokens_per_s": round(totals["tokens"] / seconds, 1)}
    if totals["drafted"]:
        out.update(drafted=totals["drafted"], accepted=totals["accepted"],
                   acceptance_rate=round(totals["accepted"] / totals["drafted"], 4),
                   tau=round(1 + totals["accepted"] / max(totals["drafts"], 1), 3))
    return out


async def bench_method(method: str, args, target_dir, draft_dir) -> dict:
    from vllm import SamplingParams

    from lkserve.config import CaptureSettings, EngineSettings
    from lkserve.engine.engine import Engine
    from lkserve.prompts import mtbench_prompts

    settings = EngineSettings(target_model=str(target_dir), draft_model=str(draft_dir) if method == "draft_model"
                              else None, method=method, num_speculative_tokens=args.k, dtype="bfloat16",
                              max_model_len=2048, max_num_seqs=max(args.concurrency), seed=0)
    engine = await Engine.create(settings, CaptureSettings(enabled=False), in_process=True)
    try:
        tok = engine.tokenizer
        questions = [q["turns"][0] for q in mtbench_prompts()][: args.prompts]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=False) for q in questions]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        # warm-up: first steps pay one-off costs (allocation, kernel selection)
        await run_batch(engine, prompts[:2], SamplingParams(max_tokens=8, temperature=0), 2)
        result = {"start_seconds": round(engine.start_seconds, 1)}
        for t in args.temperatures:
            for c in args.concurrency:
                sp = SamplingParams(max_tokens=args.max_tokens, temperature=t, seed=0, ignore_eos=True)
                result[f"T{t:g}_c{c}"] = await run_batch(engine, prompts, sp, c)
                print(method, f"T={t:g} c={c}", result[f"T{t:g}_c{c}"], file=sys.stderr, flush=True)
        return result
    finally:
        await engine.shutdown()



def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--methods", nargs="+", default=["none", "draft_model", "ngram"])
    args = ap.parse_args()
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1

    from lkserve.config import default_cache_dir
    from lkserve.models.prepare import prepare_default_models

    target_dir, draft_dir = prepare_default_models(default_cache_dir())
    out = {"model": target_dir.name, "draft": draft_dir.name, "k": args.k, "prompts": args.prompts,
           "max_tokens": args.max_tokens, "prompt_set": "MT-bench first turns", "methods": {}}
    for method in args.methods:
        out["methods"][method] = asyncio.run(bench_method(method, args, target_dir, draft_dir))
    base = out["methods"].get("none")
    if base:  # speed relative to no speculation, measured in this same run
        out["speedup_vs_none"] = {
            m: {key: round(r[key]["tokens_per_s"] / base[key]["tokens_per_s"], 3) for key in base if key in r
                and isinstance(r[key], dict)}
            for m, r in out["methods"].items() if m != "none"}
    print(json.dumps(out), file=json_out)


if __name__ == "__main__":
    main()
