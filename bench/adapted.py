"""Static vs adapted after a domain shift, served: the `static` / `adapted` rows of bench/results/bootstrap.json.

Input: a finished `lkserve demo` run (its summary.json): the demo bootstraps its draft on MT-bench only, then serves
MT-bench and, after the shift, HumanEval, while the worker adapts and hot-swaps versions. This script serves, side
by side in one run through bootstrap.py's `measure` (T=1 at 4 streams, T=0 at 1 stream, K=4, serve's layout):

- `no_spec`: the target alone (the tokens/s reference);
- `static`: the demo's bootstrapped draft (the version it started from, never trained on code);
- `adapted`: the demo's last published version (after the online adaptation on the HumanEval traffic);

on HumanEval prompts the demo did NOT serve (its traffic walks one seeded shuffle of HumanEval; the first
`by_phase.HumanEval` requests of that walk were served and trained on, the rest were never seen by either draft).

Run: flock /tmp/lkserve-engine.lock .venv/bin/python bench/adapted.py --demo ~/.cache/lkserve/demo/<run> \\
    [--adapted-version v0006] > adapted.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import log, measure


def unseen_humaneval(summary: dict) -> tuple[list[str], int]:
    """HumanEval prompts the demo never served (the tail of its seeded walk), and how many it served."""
    from lkserve.cli.demo import prompt_streams

    served = sum(1 for s in summary["samples"] if s["phase"] == "HumanEval")
    _, he = prompt_streams(summary["config"]["seed"])
    from lkserve.prompts import humaneval_prompts

    walk = [next(he) for _ in range(len(humaneval_prompts()))]
    return walk[served:], served


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished lkserve demo output directory")
    ap.add_argument("--adapted-version", help="default: the last version that served HumanEval traffic")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompts-1stream", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from lkserve.config import EngineSettings

    demo = Path(os.path.expanduser(args.demo))
    summary = json.loads((demo / "summary.json").read_text())
    shift = summary["shift"]
    adapted_v = args.adapted_version or max(shift["by_version"])
    static_dir = summary["bootstrap"]["path"]
    adapted_dir = str(demo / "worker" / "drafts" / adapted_v)
    texts, served = unseen_humaneval(summary)
    if len(texts) < max(args.prompts, args.prompts_1stream):
        raise SystemExit(f"the demo served {served} HumanEval requests: only {len(texts)} of its walk's prompts were "
                         f"never served, {max(args.prompts, args.prompts_1stream)} needed (a shorter HumanEval phase, "
                         "or fewer --prompts; summary.json's shift.windows compares on the served traffic itself)")
    tok = AutoTokenizer.from_pretrained(summary["target"])
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[: args.prompts]]
    common = {"target_model": summary["target"], "num_speculative_tokens": args.k, "max_num_seqs": 8}
    method = summary["config"]["method"]
    engines = {"no_spec": EngineSettings(method="none", **common),
               "static": EngineSettings(method=method, draft_model=static_dir, **common),
               "adapted": EngineSettings(method=method, draft_model=adapted_dir, **common)}
    out = {}
    for name, s in engines.items():
        log(name)
        out[name] = asyncio.run(measure(name, s, prompts, args))
    for name in ("static", "adapted"):
        for key in ("tok_s_1stream_t0", "tok_s_4streams_t1"):
            out[name][f"{key}_over_no_spec"] = round(out[name][key] / out["no_spec"][key], 3)
    out["adapted_over_static_tau_t1"] = round(out["adapted"]["tau_t1"] / out["static"]["tau_t1"], 3)
    out["config"] = {"demo": str(demo), "method": method, "static": static_dir, "adapted": adapted_dir,
                     "adapted_version": adapted_v, "K": args.k, "max_tokens": args.max_tokens,
                     "prompts": f"HumanEval prompts the demo never served ({served} of its walk were served)",
                     "prompts_t1_4streams": len(prompts), "prompts_t0_1stream": args.prompts_1stream,
                     "demo_minutes": summary["config"]["minutes"], "demo_shift_at": summary["config"]["shift_at"],
                     "layout": EngineSettings().layout, "dtype": EngineSettings().dtype}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
