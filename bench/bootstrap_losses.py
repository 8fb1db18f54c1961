"""LK-lambda vs KL on the bootstrap's own data: same records, same budget, same initial head, 3 seeds. JSON out.

    python bench/bootstrap_losses.py [--state <cache>/bootstrap/eagle3-0] [--positions 32768] [--seeds 0 1 2]
                                     [--arms lk_lambda kl]   # an arm: LOSS[:PRECISION[:THREADS[:LABELS]]]
                                     [--lr-schedule cosine]

Issue 17 asks for "LK-lambda vs KL on the bootstrap (same data, same budget, 3 seeds): the tau difference with its
spread". Everything here is the bootstrap's own code path, only the loss differs:

- data: the train and held-out records of a bootstrap state directory (BootstrapState.load_records: the split the
  bootstrap made by prompt; held-out is never trained on), read only;
- start: the state's `head/` (the new EAGLE-3 head rebuilt on the vocabulary of those records, untrained), copied
  to a temporary directory so the state is never written; every run starts from these same weights;
- training: lkserve.trainer.bootstrap.train with the worker's ops (lkserve.trainer.drafts.ops_for on Settings with
  method "eagle3" and settings.trainer.loss = lk_lambda or kl; everything else default: lr 1e-3, batch 1,024
  positions, gamma 0.8, eta 3, K = the engine default (2 on CPU), fp32), for --positions positions; the seed sets
  the shuffle of the passes (the data order), not the initial weights;
- measured: held-out alpha per draft position (the gate's exact top-k lower bound, lkserve.trainer.gate) and the
  gate's tau = 1 + sum_n prod_{j<=n} alpha_j, before training and after, plus the bootstrap's history (every
  eval_every_steps steps).

Summary: per loss the mean and sample standard deviation over seeds of the final held-out alpha and tau, and the
paired difference LK-lambda - KL per seed (same data order), mean +- std, min and max. One torch thread per run
(--threads); runs are sequential. Arms may also differ in precision and threads (`--arms lk_lambda:fp32:1
lk_lambda:bf16:2`: the online worker's knobs vs the offline bootstrap's, same loss), then the paired difference is
first arm minus second and the summary adds positions/s. LABELS `completion` trains on the completions' positions
only (lkserve.trainer.teacher.labels_from at the chat template's generation header: the prompt is read, not
predicted); every arm is evaluated on the whole held-out split (`after`) and on its completions only
(`after_completion`, the positions serving drafts). --lr-schedule cosine decays every arm's lr over its budget, so
the end point is not one noisy step of a constant lr. Each run records the padded work's useful fraction (context
tokens over padded tokens) of its records' batches in file order. Writes bench/results/bootstrap_losses.json (after
every run, so a partial run keeps its rows) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.layout import host_cpu

RESULTS = ROOT / "bench" / "results" / "bootstrap_losses.json"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def _mean_or_none(values) -> float | None:
    """Mean over the runs that had rows at this draft position (None: a position no run reached)."""
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


def arm_of(run: dict) -> str:
    return run.get("arm", run["loss"])


def parse_arm(arm: str, threads: int) -> tuple[str, str, int, str]:
    """LOSS[:PRECISION[:THREADS[:LABELS]]] -> (loss, precision, threads, labels); fp32, --threads and all unless
    given."""
    loss, precision, n, labels = (arm.split(":") + ["fp32", str(threads), "all"][arm.count(":"):])[:4]
    return loss, precision, int(n), labels


def useful_fraction(groups: list) -> float:
    """Context tokens over padded tokens (each batch padded to its longest record) of one pass's batches."""
    lens = [[len(r.context_token_ids) for r in g] for g in groups]
    return sum(map(sum, lens)) / sum(len(x) * max(x) for x in lens)


def completion_start(record, header: list[int]) -> int:
    """Context position of the first completion token: after the first chat-template generation header
    (`header`, e.g. "<|im_start|>assistant\\n"); 0 when there is none (text without a prompt)."""
    ctx, n = list(record.context_token_ids), len(header)
    return next((i + n for i in range(len(ctx) - n + 1) if ctx[i: i + n] == header), 0)


def completions_only(records: list, header: list[int]) -> list:
    """teacher.completion_labels where the records carry their completion_start tag, else cut at the header."""
    from lkserve.trainer.teacher import completion_labels, labels_from

    tagged = completion_labels(records)
    if tagged is not None:
        return tagged
    out = [labels_from(r, completion_start(r, header)) for r in records]
    return [r for r in out if r.num_positions]


def summarise(runs: list[dict], losses: list[str]) -> dict:
    """Per arm (`losses`: arm names; an arm of a loss alone is its loss) the held-out alpha/tau over seeds, and the
    paired difference of two arms by seed."""
    out: dict = {}
    for loss in losses:
        rs = [r for r in runs if arm_of(r) == loss]
        if rs:
            out[loss] = {"heldout_alpha": stats([r["after"]["alpha_mean"] for r in rs]),
                         "heldout_tau": stats([r["after"]["tau"] for r in rs]),
                         **({"heldout_completion_alpha": stats([r["after_completion"]["alpha_mean"] for r in rs]),
                             "heldout_completion_tau": stats([r["after_completion"]["tau"] for r in rs])}
                            if all("after_completion" in r for r in rs) else {}),
                         "alpha_per_position_mean": [_mean_or_none(r["after"]["alpha_per_position"][n] for r in rs)
                                                     for n in range(len(rs[0]["after"]["alpha_per_position"]))],
                         "train_seconds": stats([r["train_seconds"] for r in rs]),
                         **({"positions_per_s": stats([r["positions_per_s"] for r in rs])}
                            if all("positions_per_s" in r for r in rs) else {})}
    if len(losses) == 2:
        a, b = losses
        seeds = sorted({r["seed"] for r in runs if arm_of(r) == a} & {r["seed"] for r in runs if arm_of(r) == b})
        if seeds:
            get = lambda arm, s, key: next(r for r in runs if arm_of(r) == arm and r["seed"] == s)["after"][key]
            out[f"{a}_minus_{b}"] = {
                "paired_by_seed": seeds,
                "tau": stats([get(a, s, "tau") - get(b, s, "tau") for s in seeds]),
                "alpha": stats([get(a, s, "alpha_mean") - get(b, s, "alpha_mean") for s in seeds]),
            }
            pair = lambda arm, s: next(r for r in runs if arm_of(r) == arm and r["seed"] == s)
            if all("after_completion" in pair(x, s) for x in (a, b) for s in seeds):
                get_c = lambda arm, s, key: pair(arm, s)["after_completion"][key]
                out[f"{a}_minus_{b}"]["completion_tau"] = stats([get_c(a, s, "tau") - get_c(b, s, "tau")
                                                                 for s in seeds])
                out[f"{a}_minus_{b}"]["completion_alpha"] = stats(
                    [get_c(a, s, "alpha_mean") - get_c(b, s, "alpha_mean") for s in seeds])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", default=None, help="bootstrap state directory (default <cache>/bootstrap/eagle3-0)")
    ap.add_argument("--arms", "--losses", nargs="+", default=["lk_lambda", "kl"],
                    help="LOSS[:PRECISION[:THREADS[:LABELS]]] each (default: lk_lambda kl, fp32, --threads, "
                         "all; LABELS all or completion)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                    help="cosine: over each run's budget (total_steps = positions / batch_positions)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--positions", type=int, default=32_768, help="training budget per run, in positions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    from lkserve.config import EngineSettings, Settings, TrainerSettings
    from lkserve.models.smollm2 import TARGET_NAME
    from lkserve.trainer.bootstrap import BootstrapState, train
    from lkserve.trainer.drafts import ops_for
    from lkserve.trainer.examples import split_by_positions
    from lkserve.trainer.train import native_bf16, set_threads

    cache = Settings().cache_dir
    state_dir = args.state or os.path.join(cache, "bootstrap", "eagle3-0")
    state = BootstrapState(state_dir)
    got = state.load_records()
    if got is None:
        raise SystemExit(f"{state_dir}: no records.lkvr yet")
    train_r, held_r, meta = got
    head_src = state.path(BootstrapState.HEAD)
    if not os.path.isfile(os.path.join(head_src, "config.json")):
        raise SystemExit(f"{state_dir}: no rebuilt head/ (not an EAGLE-3 bootstrap state?)")
    target = meta.get("target") or str(Path(cache) / "models" / TARGET_NAME)
    work = Path(tempfile.mkdtemp(prefix="bootstrap-losses-"))
    head = work / "head"
    shutil.copytree(head_src, head)  # the state is read only: every run loads the same copy
    set_threads(args.threads)

    def settings_for(arm: str) -> Settings:
        loss, precision, threads, _ = parse_arm(arm, args.threads)
        t = TrainerSettings(loss=loss, threads=threads, precision=precision, lr_schedule=args.lr_schedule)
        t = t.model_copy(update={"total_steps": max(1, args.positions // t.batch_positions)})
        return Settings(cache_dir=work, engine=EngineSettings(method="eagle3", draft_model=str(head),
                                                              target_model=str(target)), trainer=t)

    base = settings_for(args.arms[0])
    from transformers import AutoTokenizer

    header = AutoTokenizer.from_pretrained(target).encode("<|im_start|>assistant\n")
    train_c, held_c = completions_only(train_r, header), completions_only(held_r, header)
    ops0 = ops_for(base)
    t0 = time.perf_counter()
    before = ops0.evaluate(ops0.trainer(head).model, held_r).as_dict()
    log(f"before: held-out alpha {before['alpha_mean']:.4f} tau {before['tau']:.4f} ({time.perf_counter() - t0:.0f} s)")
    config = {"state": state_dir, "capture_meta": meta, "train_records": len(train_r),
              "train_positions": sum(r.num_positions for r in train_r), "heldout_records": len(held_r),
              "heldout_positions": sum(r.num_positions for r in held_r), "initial_head": head_src,
              "train_completion_positions": sum(r.num_positions for r in train_c),
              "heldout_completion_positions": sum(r.num_positions for r in held_c),
              "lr_schedule": args.lr_schedule, "eval_positions": base.trainer.bootstrap_eval_positions,
              "positions_per_run": args.positions, "seeds": args.seeds, "arms": args.arms,
              "threads": args.threads, "batch_positions": base.trainer.batch_positions,
              "lr": base.trainer.lr_for("eagle3"), "eta": base.trainer.eta, "gamma": base.trainer.gamma,
              "eval_every_steps": base.trainer.eval_every_steps,
              "cpu": host_cpu(), "native_bf16": native_bf16(),
              "K": base.engine.num_speculative_tokens,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    runs: list[dict] = []

    def write() -> None:
        result = {"summary": summarise(runs, args.arms), "before": before, "config": config, "runs": runs}
        text = json.dumps(result, indent=2)
        if not args.no_write:
            Path(args.out).write_text(text + "\n")
        return text

    try:
        for seed in args.seeds:
            for arm in args.arms:
                settings = settings_for(arm)
                loss, labels = settings.trainer.loss, parse_arm(arm, args.threads)[3]
                records = train_c if labels == "completion" else train_r
                probe = held_c if labels == "completion" else held_r
                set_threads(settings.trainer.threads)
                torch.manual_seed(seed)
                ops = ops_for(settings)
                trainer = ops.trainer(head)
                t1 = time.perf_counter()
                history, done = train(ops, trainer, records, probe, batch_positions=settings.trainer.batch_positions,
                                      max_positions=args.positions, eval_every_steps=settings.trainer.eval_every_steps,
                                      eval_positions=settings.trainer.bootstrap_eval_positions,
                                      seed=seed, progress=lambda *a: None)
                train_s = time.perf_counter() - t1
                after = ops.evaluate(trainer.model, held_r).as_dict()
                after_c = ops.evaluate(trainer.model, held_c).as_dict()
                useful = useful_fraction(split_by_positions(records, settings.trainer.batch_positions))
                runs.append({"arm": arm, "loss": loss, "labels": labels,
                             "padding_useful_fraction": round(useful, 3), "precision": settings.trainer.precision,
                             "threads": settings.trainer.threads, "seed": seed, "steps": trainer.step_count,
                             "positions": done,
                             "train_seconds": round(train_s, 1), "positions_per_s": round(done / train_s, 1),
                             "after": after, "after_completion": after_c, "history": history,
                             "load_avg": os.getloadavg()})
                log(f"{arm:16s} seed {seed}: {trainer.step_count} steps, {done} positions in {train_s:.0f} s; "
                    f"held-out alpha {after['alpha_mean']:.4f} tau {after['tau']:.4f}; completions "
                    f"{after_c['alpha_mean']:.4f} tau {after_c['tau']:.4f}")
                write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(write())


if __name__ == "__main__":
    main()
