"""Served speed of a bootstrapped draft against no speculation, vLLM's ngram and the untrained draft. JSON out.

Each row is one vLLM engine in the layout `lkserve serve` runs (EngineSettings defaults: in-process worker, eager,
dtype auto), K=4, on held-out prompts the bootstrap never trained on (lkserve.trainer.bootstrap's split: MT-bench
first turns and HumanEval stubs, alternating, chat template), `--max-tokens` each with ignore_eos:

- T=1 at 4 streams: tau (1 + accepted / verification steps, vLLM's), acceptance per draft position, tokens/s;
- T=0 at 1 stream: tau and tokens/s.

Rows: `no_spec`, `ngram`, `untrained_<kind>` (the base a bootstrap starts from), `bootstrapped_<kind>` (a draft
directory given with --bootstrapped KIND=DIR, e.g. the registry path `lkserve draft bootstrap` printed;
`bootstrapped_<kind>_<tag>` for KIND:TAG=DIR, so two drafts of one kind are served side by side). The rows
take turns (`--rounds`) so drift on a shared machine hits all alike; figures are the medians of the turns. The
`static` / `adapted` rows come from bench/adapted.py (a demo's bootstrapped draft vs its last adapted version on
HumanEval prompts the demo never served, its own run with its own no_spec row), attached with `--adapted FILE`;
`--attach NAME=FILE` stores another run of this script (e.g. at `--k 2`) under NAME.

Run (starts vLLM engines): flock /tmp/lkserve-engine.lock .venv/bin/python bench/bootstrap.py \\
    --bootstrapped draft_model=~/.cache/lkserve/drafts/v0001 [--quick]
Writes bench/results/bootstrap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import serve_batch

RESULTS = Path(__file__).resolve().parent / "results" / "bootstrap.json"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


async def run_batch(engine, prompts, sp, concurrency: int, k: int) -> dict:
    """All prompts, `concurrency` at a time: tokens/s over the batch, tau, acceptance per draft position."""
    tot = await serve_batch(engine, prompts, sp, concurrency, f"boot-bench-{concurrency}-{sp.temperature}")
    out = {"tokens_per_s": tot["tokens"] / tot["seconds"], "tokens": tot["tokens"]}
    if tot["drafts"]:
        out["tau"] = 1 + tot["accepted"] / tot["drafts"]
        out["acceptance_per_position"] = [a / d if d else None for a, d in zip(tot["pos_accepted"][:k],
                                                                             tot["pos_drafted"][:k])]
    return out


async def measure(name: str, settings, prompts, args) -> dict:
    from lkserve.config import CaptureSettings
    from lkserve.engine.engine import Engine, sampling_params

    engine = await Engine.create(settings, CaptureSettings(enabled=False), None)
    try:
        await run_batch(engine, prompts[:2], sampling_params(max_tokens=8, temperature=0.0), 2, args.k)  # warm-up
        t1 = await run_batch(engine, prompts, sampling_params(max_tokens=args.max_tokens, temperature=1.0,
                                                              ignore_eos=True), 4, args.k)
        t0 = await run_batch(engine, prompts[: args.prompts_1stream],
                             sampling_params(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True), 1, args.k)
    finally:
        await engine.shutdown()
    row = {"start_seconds": round(engine.start_seconds, 1), "tau_t1": t1.get("tau"), "tau_t0": t0.get("tau"),
           "acceptance_per_position_t1": t1.get("acceptance_per_position"),
           "tok_s_1stream_t0": t0["tokens_per_s"], "tok_s_4streams_t1": t1["tokens_per_s"]}
    log(name, json.dumps(row))
    return row


def heldout_prompts(target: str, n: int) -> list[list[int]]:
    """The first `n` held-out prompts of the bootstrap split (fraction 0.2, seed 0), MT-bench and HumanEval
    alternating, as token ids."""
    from transformers import AutoTokenizer

    from lkserve.trainer import bootstrap

    tok = AutoTokenizer.from_pretrained(target)
    _, held = bootstrap.split_prompts(bootstrap.prompt_texts(), 0.2, 0)
    mt = [t for k, t in held if k.startswith("mtbench/")]
    he = [t for k, t in held if not k.startswith("mtbench/")]
    texts = [x for pair in zip(mt, he) for x in pair][:n]
    return [bootstrap.encode(tok, t, 256) for t in texts]


def median_rows(turns: list[dict]) -> dict:
    out = {}
    for key in turns[0]:
        vals = [t[key] for t in turns if t[key] is not None]
        if not vals:
            out[key] = None
        elif isinstance(vals[0], list):
            out[key] = [round(statistics.median(v), 4) if None not in v else None for v in zip(*vals)]
        else:
            out[key] = round(statistics.median(vals), 3)
    return out


def measure_rows(engines: dict, prompts, rows: dict, target, args) -> dict:
    """Every engine in turn for `--rounds` rounds; medians, ratios to no_spec, and the run's config."""
    from lkserve.config import EngineSettings

    turns: dict[str, list] = {n: [] for n in engines}
    for r in range(args.rounds):
        for name, s in engines.items():
            log(f"round {r + 1}/{args.rounds}: {name}")
            turns[name].append(asyncio.run(measure(name, s, prompts, args)))
    out = {name: median_rows(t) for name, t in turns.items()}
    ns = out["no_spec"]
    for name, row in out.items():
        row["tok_s_1stream_t0_over_no_spec"] = round(row["tok_s_1stream_t0"] / ns["tok_s_1stream_t0"], 3)
        row["tok_s_4streams_t1_over_no_spec"] = round(row["tok_s_4streams_t1"] / ns["tok_s_4streams_t1"], 3)
    out["config"] = {"target": str(target), "drafts": {n: d for n, (_, d) in rows.items()},
                     "draft_sha256": {n: sha256_of(d) for n, (_, d) in rows.items()}, "K": args.k,
                     "layout": EngineSettings().layout, "dtype": EngineSettings().dtype,
                     "enforce_eager": EngineSettings().enforce_eager, "prompts_t1_4streams": len(prompts),
                     "prompts_t0_1stream": args.prompts_1stream, "max_tokens": args.max_tokens,
                     "heldout": "lkserve.trainer.bootstrap split (fraction 0.2, seed 0), MT-bench/HumanEval alternating",
                     "rounds": args.rounds, "seed": EngineSettings().seed, "quick": args.quick}
    return out


def sha256_of(draft_dir: str) -> str | None:
    import hashlib

    f = Path(draft_dir) / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrapped", action="append", default=[], metavar="KIND[:TAG]=DIR",
                    help="a bootstrapped draft of kind draft_model or eagle3 (repeatable)")
    ap.add_argument("--prompts", type=int, default=12, help="held-out prompts at T=1, 4 streams")
    ap.add_argument("--prompts-1stream", type=int, default=4, help="held-out prompts at T=0, 1 stream")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--no-untrained", action="store_true", help="skip the untrained_<kind> rows")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lkserve"))
    ap.add_argument("--adapted", help="a bench/adapted.py JSON: its static / adapted rows (and config) are attached")
    ap.add_argument("--attach", action="append", default=[], metavar="NAME=FILE",
                    help="another run's JSON, stored under NAME (repeatable)")
    ap.add_argument("--from", dest="from_file", help="no engines: take the rows of an earlier run's JSON (printed "
                    "with --no-write), then attach --adapted / --attach and write")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.prompts_1stream, args.max_tokens = 4, 1, 32

    from lkserve.config import EngineSettings
    from lkserve.models.prepare import prepare_default_models

    boot = dict(b.split("=", 1) for b in args.bootstrapped)  # KIND or KIND:TAG -> dir
    kinds = sorted({b.split(":")[0] for b in boot} | ({"draft_model"} if not args.no_untrained else set()))
    target = None
    rows: dict[str, EngineSettings] = {}
    for kind in kinds:
        target, base = prepare_default_models(args.cache_dir, method=kind)
        if not args.no_untrained:
            rows[f"untrained_{kind}"] = (kind, str(base))
        for key, d in boot.items():
            if key.split(":")[0] == kind:
                rows["_".join(["bootstrapped", kind, *key.split(":")[1:]])] = (kind, os.path.expanduser(d))
    if target is None:
        target, _ = prepare_default_models(args.cache_dir)
    common = {"target_model": str(target), "num_speculative_tokens": args.k, "max_num_seqs": 8}
    engines = {"no_spec": EngineSettings(method="none", **common), "ngram": EngineSettings(method="ngram", **common)}
    engines.update({name: EngineSettings(method=kind, draft_model=d, **common) for name, (kind, d) in rows.items()})

    prompts = heldout_prompts(str(target), args.prompts)

    if args.from_file:
        out = json.loads(Path(args.from_file).read_text())
        out["config"].setdefault("draft_sha256", {n: sha256_of(d) for n, d in out["config"]["drafts"].items()})
    else:
        out = measure_rows(engines, prompts, rows, target, args)
    out.setdefault("static", None)
    out.setdefault("adapted", None)
    if args.adapted:
        run = json.loads(Path(args.adapted).read_text())
        out["static"], out["adapted"] = run["static"], run["adapted"]
        out["adapted_run"] = {"no_spec": run["no_spec"], "adapted_over_static_tau_t1": run["adapted_over_static_tau_t1"],
                              "config": run["config"]}
    for name, f in (a.split("=", 1) for a in args.attach):
        out[name] = json.loads(Path(f).read_text())
    if args.adapted:
        out["config"].pop("not_measured", None)
    out["config"]["static_adapted"] = "bench/adapted.py (see adapted_run.config)" if args.adapted else "not measured"
    text = json.dumps(out, indent=2)
    print(text)
    if not args.no_write and not args.quick:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
