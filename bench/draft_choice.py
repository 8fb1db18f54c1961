"""Which draft should the demo adapt: the 2-layer SmolLM2 draft model or a new EAGLE-3 head?

Both run the same `lkserve demo` (10 minutes, 3 clients at T=1, MT-bench then HumanEval, embedded Redis, the worker
training LK-lambda and hot-swapping gated versions) on this machine, one after the other, never together. The choice
is the draft whose worker reached the higher held-out tau (the gate's estimate, from the logged top-k of held-out
requests) within those 10 minutes; the tau the API reported for served requests is the cross-check.

Run:  .venv/bin/lkserve demo --draft eagle3 --out /tmp/demo-eagle3
      .venv/bin/lkserve demo --draft draft_model --out /tmp/demo-draft_model
      .venv/bin/python bench/draft_choice.py /tmp/demo-draft_model /tmp/demo-eagle3 > bench/results/draft_choice.json
(PNG of both curves: bench/results/draft_choice.png, or --plot PATH)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def served_curve(samples: list[dict], bin_seconds: float = 60.0) -> list[dict]:
    """Served acceptance and tau per `bin_seconds` of traffic, from what each response reported."""
    out = []
    end = max((s["t"] for s in samples), default=0.0)
    lo = 0.0
    while lo <= end:
        chunk = [s for s in samples if lo <= s["t"] < lo + bin_seconds]
        drafts, drafted, accepted = (sum(s[k] for s in chunk) for k in ("drafts", "drafted", "accepted"))
        if drafts:
            out.append({"t": lo + bin_seconds / 2, "requests": len(chunk), "acceptance_rate": round(accepted / drafted, 4),
                        "tau": round(1 + accepted / drafts, 4)})
        lo += bin_seconds
    return out


def served_tau(samples: list[dict]) -> float | None:
    drafts = sum(s["drafts"] for s in samples)
    return round(1 + sum(s["accepted"] for s in samples) / drafts, 4) if drafts else None


def analyse(summary: dict, last_seconds: float = 120.0) -> dict:
    """Held-out tau over time (the worker's gate: candidate and serving version), served tau over time, and the
    figures the choice uses."""
    held = summary.get("heldout") or []
    samples = sorted(summary["samples"], key=lambda s: s["t"])
    end = max((s["t"] for s in samples), default=0.0)
    serving = [h["heldout_tau_serving"] for h in held if h.get("heldout_tau_serving") is not None]
    return {
        "draft": summary.get("config", {}).get("method", "draft_model"),
        "requests": summary["requests"],
        "errors": summary["errors"],
        "steps": (summary.get("worker") or {}).get("steps"),
        "versions_published": (summary.get("worker") or {}).get("versions_published"),
        "best_heldout_tau": round(max(serving), 4) if serving else None,
        "final_heldout_tau": round(serving[-1], 4) if serving else None,
        "served_tau_first_2min": served_tau([s for s in samples if s["t"] < last_seconds]),
        "served_tau_last_2min": served_tau([s for s in samples if s["t"] >= end - last_seconds]),
        "tokens_per_s": round(sum(s["tokens"] for s in samples) / end, 1) if end else None,
        "heldout_curve": [{"t": h["t"], "steps": h.get("steps"), "tau_serving": round(h["heldout_tau_serving"], 4),
                           "tau_candidate": round(h["heldout_tau_candidate"], 4)} for h in held
                          if h.get("heldout_tau_serving") is not None],
        "served_curve": served_curve(samples),
    }


def choose(results: dict[str, dict]) -> dict:
    """The draft with the higher best held-out tau; ties (or no evidence) keep the draft model."""
    best = {k: (r["best_heldout_tau"] or 0.0) for k, r in results.items()}
    winner = max(sorted(best), key=lambda k: (best[k], k == "draft_model"))
    return {"default": winner, "by": "best held-out tau of the served version within the run", "best_heldout_tau": best}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (name, r) in zip(("tab:blue", "tab:orange", "tab:green"), results.items()):
        h = r["heldout_curve"]
        a.step([p["t"] for p in h], [p["tau_serving"] for p in h], where="post", color=color,
               label=f"{name}: serving version")
        a.plot([p["t"] for p in h], [p["tau_candidate"] for p in h], ls=":", alpha=0.6, color=color,
               label=f"{name}: candidate")
        s = r["served_curve"]
        b.plot([p["t"] for p in s], [p["tau"] for p in s], marker="o", color=color, label=name)
    a.set_title("held-out tau (worker's gate)")
    b.set_title("served tau (API usage, 60 s bins)")
    for ax in (a, b):
        ax.set_xlabel("seconds of traffic")
        ax.set_ylabel("tau (tokens per verification step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_dirs", nargs="+", help="output directories of `lkserve demo` runs (one per draft)")
    ap.add_argument("--plot", default=str(Path(__file__).parent / "results" / "draft_choice.png"))
    args = ap.parse_args()
    results = {}
    for d in args.demo_dirs:
        r = analyse(json.loads((Path(d) / "summary.json").read_text()))
        results[r["draft"]] = r
    plot(results, Path(args.plot))
    print(json.dumps({"choice": choose(results), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
