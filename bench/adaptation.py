"""The main experiment: adapting the draft on served traffic raises held-out acceptance; LK losses vs KL vs TV.

Target SmolLM2-135M-Instruct (bf16), the default initial draft (its first 2 layers), T=1, K=4, vLLM on this CPU.

1. Prompts: MT-bench first turns (chat template) and HumanEval stubs (raw completion), shuffled with a fixed seed;
   `--heldout` of each set are held out, never served as training traffic.
2. Traffic: `--train-requests` requests drawn from the training prompts (half each set, seeded T=1 sampling) are
   served by vLLM with the initial draft, capture on (the records the worker would read from Redis). The held-out
   prompts are then served once with capture on as well: those records give the exact offline alpha (the gate's).
3. Training: for each loss (LK-lambda eta=3, LK-alpha, KL, TV) and each seed, the worker's DraftTrainer starts
   from the initial draft and takes the same `--steps` steps of `--batch-positions` positions over the same traffic
   (the seed sets the batch order). Each result is written as a draft version (bf16, like the worker publishes).
4. Measurement: every version is hot-swapped into one running engine and serves the held-out prompts (same seeds,
   capture off): vLLM's acceptance rate, per-position acceptance, tau = 1 + accepted / drafts, tokens/s. The same
   held-out prompts are served by a no-speculation engine (the tokens/s reference) and by vLLM's ngram speculator.

Stages are cached in --work (records, checkpoints), so a re-run with the same arguments only redoes what is missing.
Run: .venv/bin/python bench/adaptation.py [--train-requests 160] [--steps 30] [--seeds 0 1 2] > bench/results/adaptation.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

LOSSES = ("lk_lambda", "lk_alpha", "kl", "tv")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ prompts
def split_prompts(tok, seed: int, heldout: int) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(train, held-out) lists of (domain, prompt token ids); held-out = `heldout` of each set."""
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    rng = random.Random(seed)
    mt = [q["turns"][0] for q in mtbench_prompts()]
    he = [p["prompt"] for p in humaneval_prompts()]
    rng.shuffle(mt)
    rng.shuffle(he)
    chat = lambda q: tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False), add_special_tokens=False)["input_ids"]
    raw = lambda p: tok(p, add_special_tokens=False)["input_ids"]
    held = [("mtbench", chat(q)) for q in mt[:heldout]] + [("humaneval", raw(p)) for p in he[:heldout]]
    train = [("mtbench", chat(q)) for q in mt[heldout:]] + [("humaneval", raw(p)) for p in he[heldout:]]
    return train, held


def traffic(train, n: int, seed: int) -> list[tuple[str, list[int]]]:
    """n requests, half from each domain, drawn (cycling, reshuffled) from the training prompts."""
    rng = random.Random(seed + 1)
    out = []
    for domain in ("mtbench", "humaneval"):
        pool = [p for p in train if p[0] == domain]
        picked = []
        while len(picked) < n // 2:
            rng.shuffle(pool)
            picked += pool
        out += picked[: n // 2]
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------ serving
async def serve(engine, prompts, *, seed: int, max_tokens: int, temperature: float, concurrency: int,
                capture: bool, tag: str) -> dict:
    """Serve every prompt (`concurrency` at a time, request i sampled with seed + i); totals and per position."""
    from vllm import SamplingParams

    sem = asyncio.Semaphore(concurrency)
    k = engine.settings.num_speculative_tokens
    tot = {"requests": 0, "tokens": 0, "drafts": 0, "drafted": 0, "accepted": 0,
           "pos_drafted": [0] * k, "pos_accepted": [0] * k}
    by_domain: dict[str, dict] = {}

    async def one(i, domain, ids):
        sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        async with sem:
            async for ch in engine.generate(ids, sp, f"{tag}-{i}", capture=capture):
                if ch.finished:
                    tot["requests"] += 1
                    tot["tokens"] += ch.num_output_tokens
                    d = by_domain.setdefault(domain, {"drafted": 0, "accepted": 0, "drafts": 0})
                    if ch.spec is not None:
                        for key, val in (("drafts", ch.spec.steps), ("drafted", ch.spec.drafted),
                                         ("accepted", ch.spec.accepted)):
                            tot[key] += val
                            d[key] += val
                        for j in range(min(k, len(ch.spec.per_position_drafted))):
                            tot["pos_drafted"][j] += ch.spec.per_position_drafted[j]
                            tot["pos_accepted"][j] += ch.spec.per_position_accepted[j]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, d, ids) for i, (d, ids) in enumerate(prompts)))
    seconds = time.perf_counter() - t0
    out = {"requests": tot["requests"], "tokens": tot["tokens"], "seconds": round(seconds, 1),
           "tokens_per_s": round(tot["tokens"] / seconds, 1)}
    if tot["drafted"]:
        out.update(
            drafted=tot["drafted"], accepted=tot["accepted"],
            acceptance_rate=round(tot["accepted"] / tot["drafted"], 4),
            tau=round(1 + tot["accepted"] / max(tot["drafts"], 1), 4),
            # P(position j accepted | the step drafted position j): vLLM's per-position counters
            acceptance_per_position=[round(a / d, 4) if d else None
                                     for a, d in zip(tot["pos_accepted"], tot["pos_drafted"])],
            tau_by_domain={dom: round(1 + d["accepted"] / max(d["drafts"], 1), 4) for dom, d in by_domain.items()},
        )
    return out


async def start_engine(method: str, target_dir, draft_dir, args, capture: bool):
    from lkserve.config import CaptureSettings, EngineSettings
    from lkserve.engine.engine import Engine

    settings = EngineSettings(target_model=str(target_dir),
                              draft_model=str(draft_dir) if method == "draft_model" else None, method=method,
                              num_speculative_tokens=args.k, dtype="bfloat16", max_model_len=2048,
                              max_num_seqs=args.concurrency, seed=0)
    cap = CaptureSettings(enabled=capture, top_k=32, queue_size=100_000)
    return await Engine.create(settings, cap, in_process=True)


# ------------------------------------------------------------------------------------------------ training
def train_variant(loss: str, seed: int, draft_dir: Path, records, heldout_records, args, ckpt_root: Path) -> dict:
    """Same steps, same traffic for every loss; the seed sets the batch order. Writes a bf16 draft version."""
    import torch

    from lkserve.trainer.examples import build_batch, split_by_positions
    from lkserve.trainer.gate import evaluate
    from lkserve.trainer.publish import write_checkpoint
    from lkserve.trainer.train import DraftTrainer

    version = f"{loss}-s{seed}"
    path = ckpt_root / "drafts" / version
    meta_file = ckpt_root / f"{version}.json"
    if path.is_dir() and meta_file.is_file():
        return json.loads(meta_file.read_text())
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trainer = DraftTrainer(str(draft_dir), loss=loss, eta=3.0, gamma=0.8, lr=args.lr, num_positions=args.k)
    batches, t0, curve = [], time.perf_counter(), []
    positions = 0
    for step in range(args.steps):
        if not batches:  # a new epoch in a new order
            order = list(records)
            rng.shuffle(order)
            batches = split_by_positions(order, args.batch_positions)
        batch = build_batch(batches.pop(), num_positions=args.k)
        res = trainer.step(batch)
        positions += res.rows
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            ev = evaluate(trainer.model, heldout_records, num_positions=args.k)
            curve.append({"step": step + 1, "positions": positions, "heldout_alpha": round(ev.alpha_mean, 4)})
            log(f"  {version} step {step + 1}: loss {res.loss:.4f} held-out alpha {ev.alpha_mean:.4f}")
    seconds = time.perf_counter() - t0
    ev = evaluate(trainer.model, heldout_records, num_positions=args.k)
    (ckpt_root / "drafts").mkdir(parents=True, exist_ok=True)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    write_checkpoint(trainer.model, draft_dir, ckpt_root, version, {"loss": loss, "seed": seed})
    meta = {"version": version, "loss": loss, "seed": seed, "steps": args.steps, "positions": positions,
            "train_seconds": round(seconds, 1), "positions_per_s": round(positions / seconds, 1),
            "heldout_offline": {"alpha": round(ev.alpha_mean, 4), "tau_chain": round(ev.tau, 4),
                                "alpha_per_position": finite(ev.alpha_per_position)},
            "curve": curve}
    meta_file.write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------ summary
def finite(values) -> list[float | None]:
    """Strict JSON has no NaN: a position nothing reached is null."""
    return [None if math.isnan(v) else round(v, 4) for v in values]


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def summarise(out: dict, seeds: list[int]) -> dict:
    ev = out["vllm_heldout"]
    none_tps = ev.get("none", {}).get("tokens_per_s")
    table = {}
    for name in ("initial", "ngram"):
        if name in ev:
            r = ev[name]
            table[name] = {"tau": r["tau"], "acceptance_rate": r["acceptance_rate"], "tokens_per_s": r["tokens_per_s"],
                           "speedup_vs_none": round(r["tokens_per_s"] / none_tps, 3) if none_tps else None}
            if name == "initial":
                table[name]["offline_alpha"] = out["initial_offline"]["alpha"]
    for loss in LOSSES:
        runs = [ev[f"{loss}-s{s}"] for s in seeds if f"{loss}-s{s}" in ev]
        if not runs:
            continue
        offline = [out["training"][f"{loss}-s{s}"]["heldout_offline"]["alpha"] for s in seeds
                   if f"{loss}-s{s}" in out["training"]]
        table[loss] = {"tau": spread([r["tau"] for r in runs]),
                       "acceptance_rate": spread([r["acceptance_rate"] for r in runs]),
                       "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
                       "offline_alpha": spread(offline)}
        if none_tps:
            table[loss]["speedup_vs_none"] = round(table[loss]["tokens_per_s"]["mean"] / none_tps, 3)
    kl = table.get("kl", {}).get("tau", {}).get("mean")
    init = table.get("initial", {}).get("tau")
    for loss in LOSSES:
        if loss in table:
            t = table[loss]["tau"]["mean"]
            table[loss]["tau_gain_vs_kl_pct"] = round(100 * (t - kl) / kl, 2) if kl else None
            table[loss]["tau_gain_vs_initial_pct"] = round(100 * (t - init) / init, 2) if init else None
    return table


# ------------------------------------------------------------------------------------------------ main
async def run(args) -> dict:
    from lkserve.config import default_cache_dir
    from lkserve.models.prepare import prepare_default_models

    torch_threads = args.train_threads
    target_dir, draft_dir = prepare_default_models(default_cache_dir())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    serve_kw = {"max_tokens": args.max_tokens, "temperature": args.temperature, "concurrency": args.concurrency}
    out: dict = {"model": target_dir.name, "initial_draft": draft_dir.name, "k": args.k,
                 "temperature": args.temperature, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                 "train_requests": args.train_requests, "heldout_prompts_per_set": args.heldout,
                 "steps": args.steps, "batch_positions": args.batch_positions, "lr": args.lr, "seeds": args.seeds,
                 "losses": list(LOSSES), "training": {}, "vllm_heldout": {}}

    engine = await start_engine("draft_model", target_dir, draft_dir, args, capture=True)
    try:
        train, held = split_prompts(engine.tokenizer, 0, args.heldout)
        # -- traffic with the initial draft: the training records and the held-out records --------------------
        rec_file = work / (f"records-{args.train_requests}-{args.max_tokens}"
                           + (f"-h{args.heldout}" if args.heldout != 16 else "") + ".pkl")
        if rec_file.is_file():
            data = pickle.loads(rec_file.read_bytes())
        else:
            await engine.drain_capture()
            log(f"serving {args.train_requests} training requests with the initial draft (capture on) ...")
            data = {"train_serving": await serve(engine, traffic(train, args.train_requests, 0), seed=10_000,
                                                 capture=True, tag="train", **serve_kw)}
            data["train"] = await engine.drain_capture()
            log(f"  {data['train_serving']}; {len(data['train'])} records")
            data["heldout_serving"] = await serve(engine, held, seed=0, capture=True, tag="held-capture", **serve_kw)
            data["heldout"] = await engine.drain_capture()
            rec_file.write_bytes(pickle.dumps(data))
        await engine.set_capture(False)
        train_records, heldout_records = data["train"], data["heldout"]
        out["traffic"] = {"train": data["train_serving"], "train_records": len(train_records),
                          "train_positions": sum(r.num_positions for r in train_records),
                          "heldout_records": len(heldout_records),
                          "heldout_positions": sum(r.num_positions for r in heldout_records)}

        # -- training: every loss, every seed, same steps -------------------------------------------------------
        import torch

        from lkserve.trainer.gate import evaluate
        from lkserve.trainer.train import load_draft

        torch.set_num_threads(torch_threads)
        base_eval = evaluate(load_draft(str(draft_dir)), heldout_records, num_positions=args.k)
        out["initial_offline"] = {"alpha": round(base_eval.alpha_mean, 4), "tau_chain": round(base_eval.tau, 4),
                                  "alpha_per_position": finite(base_eval.alpha_per_position)}
        for loss in LOSSES:
            for seed in args.seeds:
                log(f"training {loss} seed {seed} ({args.steps} steps) ...")
                meta = train_variant(loss, seed, Path(draft_dir), train_records, heldout_records, args, work)
                out["training"][meta["version"]] = meta
                log(f"  {meta['version']}: held-out alpha {meta['heldout_offline']['alpha']} "
                    f"({meta['train_seconds']} s)")

        # -- measurement through vLLM: one engine, every version hot-swapped in --------------------------------
        # (--eval-prompts: the first n held-out prompts of each set; the offline alpha above uses all of them)
        n_eval = args.eval_prompts or args.heldout
        held = [p for d in ("mtbench", "humaneval") for p in [h for h in held if h[0] == d][:n_eval]]
        serve_kw["max_tokens"] = args.eval_max_tokens or args.max_tokens
        out["vllm_eval"] = {"prompts_per_set": n_eval, "max_tokens": serve_kw["max_tokens"]}
        ev = out["vllm_heldout"]
        ev["initial"] = await serve(engine, held, seed=0, capture=False, tag="held-initial", **serve_kw)
        log(f"initial: {ev['initial']}")
        for version, meta in out["training"].items():
            res = await engine.swap_draft(str(work / "drafts" / version), version)
            if not res.ok:
                raise RuntimeError(f"swap to {version} refused: {res.reason}")
            ev[version] = await serve(engine, held, seed=0, capture=False, tag=f"held-{version}", **serve_kw)
            log(f"{version}: {ev[version]}")
    finally:
        await engine.shutdown()

    for method in ("none", "ngram"):
        engine = await start_engine(method, target_dir, None, args, capture=False)
        try:
            out["vllm_heldout"][method] = await serve(engine, held, seed=0, capture=False, tag=f"held-{method}",
                                                      **serve_kw)
            log(f"{method}: {out['vllm_heldout'][method]}")
        finally:
            await engine.shutdown()
    out["summary"] = summarise(out, args.seeds)
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-requests", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=16, help="held-out prompts per set (MT-bench, HumanEval)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-positions", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per set served through vLLM "
                    "for each version (default: all --heldout)")
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="tokens per held-out request (default "
                    "--max-tokens)")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="cache of records and checkpoints (default <cache>/bench/adaptation)")
    args = ap.parse_args()
    if args.work is None:
        from lkserve.config import default_cache_dir

        args.work = str(Path(default_cache_dir()) / "bench" / "adaptation")
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    t0 = time.perf_counter()
    out = asyncio.run(run(args))
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, allow_nan=False), file=json_out)


if __name__ == "__main__":
    main()
