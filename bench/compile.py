"""Eager vs compiled vLLM on this CPU: is `enforce_eager=True` (serve's default) the faster choice? JSON out.

For each method (no speculation, and each draft kind given) two engines in serve's layout, identical but for
`enforce_eager` (False: vLLM's default compilation for the CPU backend, torch.compile/inductor), serve the same
held-out prompts as bench/bootstrap.py (its `measure`: T=1 at 4 streams, T=0 at 1 stream, K=4). Also the
engine start-up seconds (compilation is paid there). Eager and compiled take turns (`--rounds`); medians.

Run (starts vLLM engines): flock /tmp/lkserve-engine.lock .venv/bin/python bench/compile.py \\
    [--draft draft_model=DIR] [--draft eagle3=DIR] [--rounds 2]
Writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import heldout_prompts, log, measure, median_rows

RESULTS = Path(__file__).resolve().parent / "results" / "compile.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", action="append", default=[], metavar="KIND=DIR", help="also a draft of this kind")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts at T=1, 4 streams")
    ap.add_argument("--prompts-1stream", type=int, default=3, help="held-out prompts at T=0, 1 stream")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lkserve"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from lkserve.config import EngineSettings
    from lkserve.models.prepare import prepare_default_models

    target, _ = prepare_default_models(args.cache_dir)
    common = {"target_model": str(target), "num_speculative_tokens": args.k, "max_num_seqs": 8}
    methods = {"no_spec": EngineSettings(method="none", **common)}
    for kind, d in (x.split("=", 1) for x in args.draft):
        methods[kind] = EngineSettings(method=kind, draft_model=os.path.expanduser(d), **common)
    prompts = heldout_prompts(str(target), args.prompts)

    turns: dict[str, list] = {}
    for r in range(args.rounds):
        for name, s in methods.items():
            for eager in (True, False):
                key = f"{name}/{'eager' if eager else 'compiled'}"
                log(f"round {r + 1}/{args.rounds}: {key}")
                t0 = time.perf_counter()
                row = asyncio.run(measure(key, s.model_copy(update={"enforce_eager": eager}), prompts, args))
                row["run_seconds"] = time.perf_counter() - t0
                row["start_seconds"] = row.pop("start_seconds", None)
                turns.setdefault(key, []).append(row)
    out = {"rows": {k: median_rows(t) for k, t in turns.items()}, "compiled_over_eager": {}}
    for name in methods:
        e, c = out["rows"][f"{name}/eager"], out["rows"][f"{name}/compiled"]
        out["compiled_over_eager"][name] = {
            k: round(c[k] / e[k], 3) for k in ("tok_s_1stream_t0", "tok_s_4streams_t1", "start_seconds")
            if c.get(k) and e.get(k)}
    out["config"] = {"target": str(target), "drafts": dict(x.split("=", 1) for x in args.draft), "K": args.k,
                     "layout": EngineSettings().layout, "dtype": EngineSettings().dtype,
                     "prompts_t1_4streams": len(prompts), "prompts_t0_1stream": args.prompts_1stream,
                     "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "heldout": "lkserve.trainer.bootstrap split (fraction 0.2, seed 0), MT-bench/HumanEval alternating"}
    text = json.dumps(out, indent=2)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
