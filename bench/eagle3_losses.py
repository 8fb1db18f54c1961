"""EAGLE-3 head for SmolLM2-135M: how fast does a new head learn from served traffic, with LK-lambda, LK-alpha and KL?

vLLM serves `--requests` training prompts (MT-bench and HumanEval, half each, T=1, K=4) with the default new head
(`prepare_default_models(method="eagle3")`) and captures the target's distributions and aux hidden states; then 16
held-out prompts of each set. Each loss trains the same head from the same start for `--steps` steps of 512 positions
(same batches, in the same order, lr `--lr`), and the held-out alpha and tau (the worker's gate estimate, every
labelled position at every TTT step) are printed every 10 steps. Offline only: no trained head is served here.

Run: .venv/bin/python bench/eagle3_losses.py > bench/results/eagle3_losses.json     (~10 min here)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


async def capture(args):
    from adaptation import serve, split_prompts, traffic

    from lkserve.config import CaptureSettings, EngineSettings, default_cache_dir
    from lkserve.engine.engine import Engine
    from lkserve.models.prepare import prepare_default_models

    target, head = prepare_default_models(default_cache_dir(), method="eagle3")
    settings = EngineSettings(target_model=str(target), draft_model=str(head), method="eagle3",
                              num_speculative_tokens=4, dtype="bfloat16", max_model_len=2048, max_num_seqs=4, seed=0)
    engine = await Engine.create(settings, CaptureSettings(top_k=32, queue_size=100_000, hidden_states=True),
                                 in_process=True)
    try:
        train, held = split_prompts(engine.tokenizer, args.seed, 16)
        served = await serve(engine, traffic(train, args.requests, args.seed), seed=0, max_tokens=128,
                             temperature=1.0, concurrency=4, capture=True, tag="train")
        train_records = await engine.drain_capture()
        await serve(engine, held, seed=50_000, max_tokens=128, temperature=1.0, concurrency=4, capture=True,
                    tag="heldout")
        held_records = await engine.drain_capture()
    finally:
        await engine.shutdown()
    return str(target), str(head), served, train_records, held_records


def train_curve(loss, target, head, train_records, held_records, args) -> dict:
    import torch

    from lkserve.trainer.drafts import Eagle3Ops
    from lkserve.trainer.examples import split_by_positions

    torch.manual_seed(args.seed)
    ops = Eagle3Ops(target_dir=target, loss=loss, eta=3.0, gamma=0.8, lr=args.lr, grad_clip=1.0, num_positions=4,
                    max_context=2048, batch_positions=512, warmup_steps=8)
    trainer = ops.trainer(head)
    rng = random.Random(args.seed)
    groups = []
    while len(groups) < args.steps:
        order = list(train_records)
        rng.shuffle(order)
        groups += split_by_positions(order, 512)

    def point(step, seconds):
        ev = ops.evaluate(trainer.model, held_records)
        return {"step": step, "heldout_alpha": round(ev.alpha_mean, 4), "heldout_tau": round(ev.tau, 4),
                "alpha_per_step": [round(a, 4) for a in ev.alpha_per_position], "train_seconds": round(seconds, 1)}

    curve, seconds = [point(0, 0.0)], 0.0
    for i, group in enumerate(groups[: args.steps], 1):
        t0 = time.perf_counter()
        trainer.step(ops.batch(group))
        seconds += time.perf_counter() - t0
        if i % 10 == 0 or i == args.steps:
            curve.append(point(i, seconds))
        print(loss, i, file=sys.stderr, flush=True)
    return {"curve": curve, "final": curve[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--losses", default="lk_lambda,lk_alpha,kl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from lkserve.cli.bench_io import json_stdout

    out = json_stdout()
    target, head, served, train_records, held_records = asyncio.run(capture(args))
    import torch

    torch.set_num_threads(args.threads)
    result = {"config": vars(args), "target": target, "head": head, "served_with_untrained_head": served,
              "train_positions": sum(r.num_positions for r in train_records),
              "heldout_positions": sum(r.num_positions for r in held_records), "losses": {}}
    for loss in args.losses.split(","):
        result["losses"][loss] = train_curve(loss, target, head, train_records, held_records, args)
    out.write(json.dumps(result, indent=1) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
