"""Domain shift: traffic switches from MT-bench to HumanEval mid-run; how fast does the live draft recover?

Runs the full product as the demo does (embedded Redis, gateway + vLLM, worker training LK-lambda and hot-swapping
gated versions, `--clients` concurrent OpenAI clients at T=1) for `--minutes`, traffic switching domain at
`--shift-at` of the run. From what each response reported (draft version, drafted/accepted tokens) it computes:

- acceptance over time and per draft version (PNG: bench/results/domain_shift.png);
- pre-shift acceptance: the last `--window` requests before the shift;
- the drop right after the shift (first `--window` requests after it);
- recovery: how many requests after the shift until the acceptance of the last `--window` requests is back within 5%
  of the pre-shift level (null if it never was within the run).

HumanEval and MT-bench differ in how hard they are for the draft, so "recovered" is relative to the pre-shift level
of the adapted draft, and the per-domain acceptance of the initial draft is reported alongside.
Run: .venv/bin/python bench/domain_shift.py [--minutes 12] > bench/results/domain_shift.json
     .venv/bin/python bench/domain_shift.py --from-demo <demo output dir>    (analyse a finished `lkserve demo` run)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def acceptance(samples: list[dict]) -> float | None:
    drafted = sum(s["drafted"] for s in samples)
    return round(sum(s["accepted"] for s in samples) / drafted, 4) if drafted else None


def analyse(summary: dict, window: int, tolerance: float = 0.05) -> dict:
    samples = sorted(summary["samples"], key=lambda s: s["t"])
    shift_t = summary.get("domain_shift_t")
    pre = [s for s in samples if shift_t is None or s["t"] < shift_t]
    post = [s for s in samples if shift_t is not None and s["t"] >= shift_t]
    pre_level = acceptance(pre[-window:])
    recovery = None
    if pre_level and post:
        for i in range(window, len(post) + 1):
            level = acceptance(post[i - window:i])
            if level is not None and level >= (1 - tolerance) * pre_level:
                recovery = {"requests_after_shift": i, "seconds_after_shift": round(post[i - 1]["t"] - shift_t, 1),
                            "acceptance": level}
                break
    versions: dict[str, dict] = {}
    for s in samples:
        v = versions.setdefault(s["version"] or "?", {"first_t": s["t"], "requests": 0, "by_phase": {}})
        v["requests"] += 1
        v["by_phase"].setdefault(s["phase"], []).append(s)
    per_version = {v: {"first_t": round(d["first_t"], 1), "requests": d["requests"],
                       "acceptance_by_phase": {p: acceptance(ss) for p, ss in d["by_phase"].items()}}
                   for v, d in versions.items()}
    return {"requests": len(samples), "errors": summary.get("errors"), "domain_shift_t": shift_t,
            "swaps": summary.get("swaps"), "window_requests": window,
            "acceptance_first_window": acceptance(samples[:window]),
            "acceptance_pre_shift": pre_level, "acceptance_just_after_shift": acceptance(post[:window]),
            "acceptance_end": acceptance(post[-window:]) if post else None,
            "recovery_within_5pct": recovery, "per_version": per_version,
            "worker": summary.get("worker")}


def plot(summary: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = sorted(summary["samples"], key=lambda s: s["t"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs, ys, vs = [], [], []
    for i in range(window, len(samples) + 1):
        a = acceptance(samples[i - window:i])
        if a is not None:
            xs.append(samples[i - 1]["t"])
            ys.append(a)
            vs.append(samples[i - 1]["version"])
    ax.plot(xs, ys, color="0.4", lw=1, label=f"acceptance, last {window} requests")
    order = list(dict.fromkeys(s["version"] for s in samples))
    cmap = plt.get_cmap("viridis", max(len(order), 2))
    for j, v in enumerate(order):
        pts = [(s["t"], s["accepted"] / s["drafted"]) for s in samples if s["version"] == v and s["drafted"]]
        if pts:
            ax.scatter(*zip(*pts), s=6, alpha=0.35, color=cmap(j), label=f"request, draft {v}")
    if summary.get("domain_shift_t") is not None:
        ax.axvline(summary["domain_shift_t"], color="tab:red", lw=2, label="MT-bench -> HumanEval")
    ax.set_ylim(0, max(ys + [0.1]) * 1.6)
    ax.set_xlabel("seconds of traffic")
    ax.set_ylabel("accepted / drafted")
    ax.set_title("domain shift: acceptance per request and draft version")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--shift-at", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=20, help="requests per acceptance window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-demo", default=None, help="analyse this finished demo directory instead of running")
    ap.add_argument("--plot", default=str(Path(__file__).parent / "results" / "domain_shift.png"))
    args = ap.parse_args()
    from lkserve.cli.bench_io import json_stdout

    json_out = json_stdout()  # vLLM's child processes log to fd 1
    if args.from_demo:
        summary = json.loads((Path(args.from_demo) / "summary.json").read_text())
    else:
        from lkserve.cli.demo import DemoConfig, run_demo

        summary = run_demo(DemoConfig(minutes=args.minutes, clients=args.clients, shift_at=args.shift_at,
                                      seed=args.seed))
    out = analyse(summary, args.window)
    out["config"] = summary.get("config")
    plot(summary, Path(args.plot), args.window)
    out["plot"] = str(Path(args.plot).resolve().relative_to(Path.cwd().resolve())) \
        if Path(args.plot).resolve().is_relative_to(Path.cwd().resolve()) else args.plot
    print(json.dumps(out), file=json_out)


if __name__ == "__main__":
    main()
