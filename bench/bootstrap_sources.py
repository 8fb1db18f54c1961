"""Which bootstrap data buys more held-out acceptance per CPU-minute: served capture, or teacher-forced passes. JSON.

Sources, each collected side by side in one run on the bootstrap's train prompts (MT-bench first turns + HumanEval
stubs, lkserve.trainer.bootstrap's split; the held-out 20 % never trained on):

- `generated`: what serving captures today: the spec-decoding engine (the untrained draft, K=4, T=1) with capture
  on, records of verified positions only (bootstrap.capture_split).
- `self`: the target's own completions from an engine without speculation at `--concurrency` streams, then one
  teacher-forced target pass per window (lkserve.trainer.teacher): a label at every position.
- `text`: teacher-forced passes over text and code of installed packages (teacher.package_texts; never the standard
  library or Debian's metadata), as many tokens as `self` has.

Held-out: the target's own completions of the held-out prompts, teacher-forced (every position a label; the same
records for every source). Each source then trains the same draft (the worker's ops, LK-lambda) for the same number
of positions (`--train-positions`, cycling the data when it has fewer), and the JSON reports per source: positions
collected, wall and CPU seconds (this process tree: the engine-core child included) to collect them, positions per
CPU-second, held-out alpha/tau after training, and tau gained per minute of data + training.

Run (starts vLLM engines; takes /tmp/lkserve-engine.lock while they run): .venv/bin/python bench/bootstrap_sources.py [--quick]
Writes bench/results/bootstrap_sources_<method>.json (`--method draft_model|eagle3`).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.layout import cpu_seconds, tree

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON

RESULTS = Path(__file__).resolve().parent / "results" / "bootstrap_sources_{method}.json"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def tree_cpu() -> float:
    """CPU seconds of this process and its live descendants (the in-process engine's EngineCore), plus reaped
    children."""
    live = sum(c for c in (cpu_seconds(p) for p in tree(os.getpid())) if c is not None)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return live + ch.ru_utime + ch.ru_stime


class Meter:
    def __enter__(self):
        self.t, self.c = time.perf_counter(), tree_cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, tree_cpu() - self.c


def settings_for(args, cache: Path):
    from lkserve.config import EngineSettings, Settings, TrainerSettings
    from lkserve.models.prepare import prepare_default_models

    target, draft = prepare_default_models(cache, method=args.method)
    engine = EngineSettings(target_model=str(target), draft_model=str(draft), method=args.method,
                            num_speculative_tokens=4, dtype="float32", max_model_len=1024, max_num_seqs=64,
                            enforce_eager=True, seed=args.seed)
    trainer = TrainerSettings(threads=args.threads, batch_positions=args.batch_positions, eval_every_steps=10**9,
                              metrics_port=None)
    capture = {"hidden_states": args.method == "eagle3", "hidden_dtype": "bf16"}
    return Settings(cache_dir=cache, engine=engine, trainer=trainer, capture=capture)


def aux_layers(settings):
    """The target layers an EAGLE-3 head reads (None for a draft model)."""
    if settings.engine.method != "eagle3":
        return None
    from lkserve.models.eagle3 import spec_from_config

    cfg = json.loads((Path(settings.engine.draft_model) / "config.json").read_text())
    return list(spec_from_config(cfg).aux_layer_ids)


async def collect_engine_data(settings, train_p, held_p, args) -> dict:
    """Self completions (no speculation) for held-out and train prompts, then served capture (`generated`)."""
    from lkserve.engine.engine import Engine
    from lkserve.trainer import bootstrap, teacher

    out = {}
    nospec = settings.engine.model_copy(update={"method": "none", "draft_model": None})
    off = settings.capture.model_copy(update={"enabled": False})
    engine = await Engine.create(nospec, off, None, in_process=True)
    try:
        enc = lambda ps: [bootstrap.encode(engine.tokenizer, t, args.max_prompt_tokens) for _, t in ps]
        out["held_texts"] = await teacher.self_generations(engine, enc(held_p), max_tokens=args.max_tokens,
                                                           concurrency=args.concurrency)
        with Meter() as m:
            out["self_texts"] = await teacher.self_generations(engine, enc(train_p), samples=args.samples,
                                                               max_tokens=args.max_tokens, concurrency=args.concurrency)
        out["self_gen"] = m
    finally:
        await engine.shutdown()
    cap = settings.capture.model_copy(update={"enabled": True, "sample_rate": 1.0})
    engine = await Engine.create(settings.engine, cap, None, in_process=True)
    try:
        enc = lambda ps: [bootstrap.encode(engine.tokenizer, t, args.max_prompt_tokens) for _, t in ps]
        with Meter() as m:
            out["generated"] = await bootstrap.generate_records(
                engine, enc(train_p[: args.generated_prompts]), max_tokens=args.max_tokens, temperature=1.0,
                seed=args.seed, concurrency=4)
        out["generated_meter"] = m
    finally:
        await engine.shutdown()
    return out


def teacher_pass(model, seqs, settings, args):
    from lkserve.trainer import teacher

    with Meter() as m:
        recs = teacher.teacher_records(model, seqs, top_k=settings.capture.top_k, num_positions=4,
                                       window=args.window, aux_layer_ids=aux_layers(settings))
    return recs, m


def train_source(settings, records, held, args) -> dict:
    import torch

    from lkserve.trainer import bootstrap
    from lkserve.trainer.drafts import ops_for

    torch.manual_seed(args.seed)
    ops = ops_for(settings)
    trainer = ops.trainer(settings.engine.draft_model)
    with Meter() as m:
        bootstrap.train(ops, trainer, records, held, batch_positions=args.batch_positions,
                        max_positions=args.train_positions, eval_every_steps=10**9, seed=args.seed,
                        progress=lambda *a: None)
    res = ops.evaluate(trainer.model, held).as_dict()
    return {"heldout_alpha": res["alpha_mean"], "heldout_tau": res["tau"], "alpha_per_position": res["alpha_per_position"],
            "train_wall_s": round(m.wall, 1), "train_positions_per_s": round(args.train_positions / m.wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("draft_model", "eagle3"), default="draft_model")
    ap.add_argument("--quick", action="store_true", help="a few prompts, to check the script runs")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1, help="self completions per train prompt")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--generated-prompts", type=int, default=48, help="train prompts served with capture")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--train-positions", type=int, default=60_000)
    ap.add_argument("--batch-positions", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the teacher pass and the trainer (on this "
                                                         "shared CPU 2 threads ran up to 3x slower than 1)")
    ap.add_argument("--train-prompts", type=int, help="only the first N train prompts (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lkserve"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.generated_prompts, args.train_positions = 48, 4, 2048

    import torch

    from lkserve.trainer import bootstrap, teacher

    torch.set_num_threads(args.threads)
    settings = settings_for(args, Path(args.cache_dir))
    train_p, held_p = bootstrap.split_prompts(bootstrap.prompt_texts(), 0.2, args.seed)
    if args.quick:
        train_p, held_p = train_p[:8], held_p[:4]
    elif args.train_prompts:
        train_p = train_p[: args.train_prompts]
    log(f"prompts: {len(train_p)} train, {len(held_p)} held-out")
    with open("/tmp/lkserve-engine.lock", "w") as lock:  # engines one at a time on this machine (other benches, tests)
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = asyncio.run(collect_engine_data(settings, train_p, held_p, args))
    model = teacher.load_target(settings.engine.target_model)
    held, _ = teacher_pass(model, data["held_texts"], settings, args)
    self_recs, self_tf = teacher_pass(model, data["self_texts"], settings, args)
    n_tokens = sum(map(len, data["self_texts"]))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(settings.engine.target_model)
    with Meter() as read:
        text_seqs = teacher.package_texts(tok, n_tokens, seed=args.seed)
    text_recs, text_tf = teacher_pass(model, text_seqs, settings, args)
    del model

    gm, sg = data["generated_meter"], data["self_gen"]
    sources = {
        "generated": (data["generated"], gm.wall, gm.cpu),
        "self": (self_recs, sg.wall + self_tf.wall, sg.cpu + self_tf.cpu),
        "text": (text_recs, read.wall + text_tf.wall, read.cpu + text_tf.cpu),
    }
    out = {"config": {"method": args.method, "target": str(settings.engine.target_model), "draft": str(settings.engine.draft_model),
                      "layout": "in_process", "K": 4, "temperature": 1.0, "max_tokens": args.max_tokens,
                      "train_prompts": len(train_p), "heldout_prompts": len(held_p),
                      "heldout_positions": sum(r.num_positions for r in held), "concurrency": args.concurrency,
                      "window": args.window, "train_positions": args.train_positions, "loss": settings.trainer.loss,
                      "threads": args.threads, "seed": args.seed, "quick": args.quick,
                      "note": "a shared 2-core machine: compare the sources' ratios, not absolute figures"},
           "self_generation": {"tokens": n_tokens, "wall_s": round(sg.wall, 1), "cpu_s": round(sg.cpu, 1),
                               "teacher_wall_s": round(self_tf.wall, 1)}}
    from lkserve.trainer.drafts import ops_for

    ops = ops_for(settings)
    untrained = ops.evaluate(ops.load(settings.engine.draft_model), held).as_dict()
    out["untrained"] = {"heldout_alpha": untrained["alpha_mean"], "heldout_tau": untrained["tau"]}
    for name, (recs, wall, cpu) in sources.items():
        n = sum(r.num_positions for r in recs)
        log(f"{name}: {n} positions in {wall:.0f} s ({cpu:.0f} CPU-s); training")
        row = {"positions": n, "collect_wall_s": round(wall, 1), "collect_cpu_s": round(cpu, 1),
               "positions_per_cpu_s": round(n / max(cpu, 1e-9), 1), "positions_per_wall_s": round(n / wall, 1)}
        row.update(train_source(settings, recs, held, args))
        minutes = (wall + row["train_wall_s"]) / 60
        row["tau_gain_per_minute"] = round((row["heldout_tau"] - untrained["tau"]) / minutes, 4)
        out[name] = row
        log(json.dumps({name: row}))
    g = out["generated"]["positions_per_cpu_s"]
    out["data_rate_over_generated"] = {k: round(out[k]["positions_per_cpu_s"] / g, 2) for k in ("self", "text")}
    text = json.dumps(out, indent=2)
    print(text)
    if not args.no_write and not args.quick:
        Path(str(RESULTS).format(method=args.method)).write_text(text + "\n")


if __name__ == "__main__":
    main()
