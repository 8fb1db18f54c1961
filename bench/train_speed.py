"""Draft training speed, before vs after, side by side in one run: positions/s of each trainer kind. JSON out.

    python bench/train_speed.py [--state DIR] [--baseline REV] [--threads 1 2] [--rounds 2] [--steps 4]

What is timed: what `lkserve.trainer.bootstrap.train` does per step (ops.batch(group) + trainer.step(batch)) on
consecutive groups of ~`--batch-positions` positions of the same records, for the two trainer kinds at the real
sizes: the 2-layer SmolLM2-135M draft model (49,152-id head, train_params "layers") and the new SmolLM2 EAGLE-3 head
(8,192-id truncated vocabulary, TTT over K = 4 steps), LK-lambda, AdamW, the worker's knobs. One "position" is a
labelled position of a record (what bootstrap's progress bar counts), not a training row (an EAGLE-3 position gives
up to K rows).

Variants, each in its own process (so thread settings and allocator state never leak between them), run
ALTERNATELY within every round so load from other jobs on the shared CPU hits them alike:

    old        the trainer code at --baseline (default: the commit this branch started from), extracted with
               `git archive` into a temporary directory and imported from there
    new        this tree (its lkserve/ copied at the start of the run), fp32 (the default settings): the same math,
               losses equal within rounding
    new_bf16   this tree with settings.trainer.precision = "bf16" (bf16 autocast of the matmuls)
    new*_heap_returned  (opt-in, attribution) the same with LKSERVE_KEEP_FREED_MEMORY=0: glibc returns every large
               block to the kernel again, as before (lkserve.trainer.train.keep_freed_memory)

Each process also reports the loss of its first step on the same first batch, so old and new are checked to compute
the same thing in the very run that times them. `--profile` adds a torch.profiler summary (top ops by self CPU time,
one fp32 step) per variant and kind: where the time goes before and after.

Records: the train split of a bootstrap state directory (--state, read only; e.g. <cache>/bootstrap/eagle3-0, whose
records carry EAGLE-3 aux hidden states) or, without one, teacher-forced records made here from the bootstrap's
prompts (MT-bench + HumanEval: the target's distribution and aux hidden states at every position of 512-token
windows). Writes bench/results/train_speed.json unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "train_speed.json"
BASELINE = "591ec09"  # main when this work started: the trainer before the fused loss / unit-T / bf16 changes
CACHE = os.environ.get("LKSERVE_CACHE_DIR", "/root/.cache/lkserve")
VARIANTS = ("old", "new", "new_bf16")
# attribution: without keep_freed_memory(); old_bf16 only for a --baseline that has settings.trainer.precision
EXTRA_VARIANTS = ("new_heap_returned", "new_bf16_heap_returned", "old_bf16")
KINDS = ("eagle3", "draft_model")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ records
def make_teacher_records(n_windows: int, window: int = 512):
    """Teacher-forced records of the bootstrap prompts (concatenated into `window`-token windows), as the bootstrap's
    teacher source makes them: top-32 target distribution and the head's aux hidden states at every position."""
    import torch

    from lkserve.models.prepare import prepare_default_models
    from lkserve.trainer import teacher
    from lkserve.trainer.bootstrap import encode, prompt_texts

    target, head = prepare_default_models(CACHE, method="eagle3")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    seqs, cur = [], []
    for _, text in prompt_texts():
        cur += encode(tok, text, window)
        if len(cur) >= window:
            seqs.append(cur[:window])
            cur = []
        if len(seqs) >= n_windows:
            break
    model = teacher.load_target(target)
    with torch.inference_mode():
        return teacher.teacher_records(model, seqs, top_k=32, num_positions=4,
                                       aux_layer_ids=teacher.aux_layers_of(head), window=window)


def load_records(args) -> tuple[list, dict]:
    if args.records_file:  # a pickled list of records (e.g. what an earlier run of this script saved)
        with open(args.records_file, "rb") as f:
            records = pickle.load(f)[: args.records]
        return records, {"source": f"records file {args.records_file}"}
    if args.state:
        from lkserve.trainer.bootstrap import BootstrapState

        got = BootstrapState(args.state).load_records()
        if got is None:
            raise SystemExit(f"{args.state}: no records.lkvr")
        train, _held, meta = got
        records = [r for r in train if r.num_positions][: args.records]
        return records, {"source": f"bootstrap state {args.state} (train split, first {len(records)} records)",
                         "capture_meta": meta}
    records = make_teacher_records(args.records)
    return records, {"source": f"teacher-forced records of {len(records)} 512-token windows of the bootstrap prompts "
                               "(MT-bench + HumanEval), made by this script"}


# ------------------------------------------------------------------------------------------------ one process
def worker(spec: dict) -> dict:
    """Runs inside a child process whose PYTHONPATH puts the variant's lkserve first."""
    import torch

    import lkserve
    from lkserve.models.prepare import prepare_default_models
    from lkserve.trainer import drafts
    from lkserve.trainer.examples import split_by_positions

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    with open(spec["records"], "rb") as f:
        records = pickle.load(f)
    kind, variant = spec["kind"], spec["variant"]
    knobs = {"loss": "lk_lambda", "eta": 3.0, "gamma": 0.8, "lr": 1e-3 if kind == "eagle3" else 3e-3,
             "grad_clip": 1.0, "num_positions": 4, "max_context": 2048, "batch_positions": spec["batch_positions"],
             "warmup_steps": 0}
    if variant != "old":
        knobs["precision"] = "bf16" if "_bf16" in variant else "fp32"
    if kind == "eagle3":
        target, start = prepare_default_models(CACHE, method="eagle3")
        ops = drafts.Eagle3Ops(target_dir=str(target), **knobs)
    else:
        _target, start = prepare_default_models(CACHE)
        ops = drafts.DraftModelOps(train_params="layers", lr_schedule="constant", total_steps=100_000, **knobs)
    trainer = ops.trainer(start)
    groups = split_by_positions(records, spec["batch_positions"])
    need = spec["steps"] + 1
    groups = (groups * (need // max(1, len(groups)) + 1))[:need]
    out = {"variant": variant, "kind": kind, "threads": spec["threads"], "lkserve": str(Path(lkserve.__file__).parent)}
    import resource

    steps = []
    for i, group in enumerate(groups):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        batch = ops.batch(group)
        t1 = time.perf_counter()
        res = trainer.step(batch)
        t2 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        n = sum(r.num_positions for r in group)
        if i == 0:  # warm-up step (first-touch allocations, oneDNN kernel selection); its loss is the cross-check
            out["first_loss"] = res.loss
            out["first_rows"] = res.rows
            continue
        steps.append({"positions": n, "rows": res.rows, "batch_s": t1 - t0, "step_s": t2 - t1, "loss": res.loss,
                      "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                      "minor_faults": r1.ru_minflt - r0.ru_minflt})
    pos = sum(s["positions"] for s in steps)
    total = sum(s["batch_s"] + s["step_s"] for s in steps)
    out.update({"positions": pos, "seconds": total, "positions_per_s": pos / total,
                "batch_seconds": sum(s["batch_s"] for s in steps),
                # process CPU time per position: steadier than the wall clock on a shared CPU
                "cpu_positions_per_s": pos / sum(s["user_s"] + s["sys_s"] for s in steps),
                "sys_seconds": sum(s["sys_s"] for s in steps),
                "minor_faults_per_step": sum(s["minor_faults"] for s in steps) / len(steps),
                "step_positions_per_s": [s["positions"] / (s["batch_s"] + s["step_s"]) for s in steps]})
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        batch = ops.batch(groups[1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.step(batch)
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        tot = sum(e.self_cpu_time_total for e in ev)
        out["profile_top_ops"] = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1),
                                   "share": round(e.self_cpu_time_total / tot, 3), "calls": e.count}
                                  for e in ev[:12]]
        out["profile_step_ms"] = round(tot / 1000, 1)
    return out


# ------------------------------------------------------------------------------------------------ driver
def baseline_tree(rev: str) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"lkserve-baseline-{sha[:12]}"
    if not (dest / "lkserve" / "__init__.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "lkserve"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
    return dest


def run_child(spec: dict, tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(spec["threads"]),
               VLLM_LOGGING_STREAM="ext://sys.stderr")
    if spec["variant"].endswith("_heap_returned"):
        env["LKSERVE_KEEP_FREED_MEMORY"] = "0"
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{spec['variant']} {spec['kind']} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def rate(runs: list, threads: int, kind: str, variant: str, rnd: int, key: str = "positions_per_s") -> float:
    return next(r for r in runs if r["threads"] == threads and r["kind"] == kind and r["variant"] == variant
                and r["round"] == rnd)[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", help="bootstrap state directory to take the train records from (read only)")
    ap.add_argument("--records-file", help="a pickled list of VerificationRecords instead")
    ap.add_argument("--records", type=int, default=12, help="records used (teacher windows made, or taken)")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--batch-positions", type=int, default=1024)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    records, rec_info = load_records(args)
    with tempfile.NamedTemporaryFile(prefix="train-speed-records-", suffix=".pkl", delete=False) as tmp:
        pickle.dump(records, tmp)
    # this tree's lkserve is copied once: every "new" process of the run imports the same code, whatever is edited
    # in the working tree meanwhile
    snapshot = Path(tempfile.mkdtemp(prefix="lkserve-new-"))
    shutil.copytree(ROOT / "lkserve", snapshot / "lkserve", ignore=shutil.ignore_patterns("__pycache__"))
    trees = {v: snapshot for v in VARIANTS + EXTRA_VARIANTS}
    trees["old"] = trees["old_bf16"] = baseline_tree(args.baseline)
    runs = []
    t_start = time.time()
    try:
        for rnd in range(args.rounds):
            for threads in args.threads:
                for kind in args.kinds:
                    for variant in args.variants:
                        spec = {"kind": kind, "variant": variant, "threads": threads, "records": tmp.name,
                                "steps": args.steps, "batch_positions": args.batch_positions,
                                "profile": args.profile and rnd == 0 and threads == args.threads[0]}
                        r = run_child(spec, trees[variant])
                        r["round"] = rnd
                        runs.append(r)
                        log(f"round {rnd} threads {threads} {kind:11s} {variant:8s} "
                            f"{r['positions_per_s']:7.1f} positions/s, per CPU-second {r['cpu_positions_per_s']:7.1f} "
                            f"(sys {r['sys_seconds']:.2f} s, {r['minor_faults_per_step']:.0f} faults/step; "
                            f"first loss {r['first_loss']:.6f})")
    finally:
        os.unlink(tmp.name)
        shutil.rmtree(snapshot, ignore_errors=True)

    summary: dict = {}
    for threads in args.threads:
        for kind in args.kinds:
            cell: dict = {}
            for variant in args.variants:
                rs = [r for r in runs if r["threads"] == threads and r["kind"] == kind and r["variant"] == variant]
                cell[variant] = {"positions_per_s_median": round(statistics.median(r["positions_per_s"] for r in rs), 1),
                                 "positions_per_s_runs": [round(r["positions_per_s"], 1) for r in rs],
                                 "cpu_positions_per_s_median": round(statistics.median(r["cpu_positions_per_s"]
                                                                                       for r in rs), 1),
                                 "minor_faults_per_step": round(statistics.median(r["minor_faults_per_step"]
                                                                                  for r in rs)),
                                 "first_loss": rs[0]["first_loss"]}
            if "old" in cell:
                for variant in args.variants:
                    if variant == "old":
                        continue
                    # ratio per round (old and new ran back to back), then the median and range over rounds
                    ratios = [rate(runs, threads, kind, variant, rnd) / rate(runs, threads, kind, "old", rnd)
                              for rnd in range(args.rounds)]
                    cell[variant]["over_old_median"] = round(statistics.median(ratios), 2)
                    cell[variant]["over_old_rounds"] = [round(x, 2) for x in ratios]
                    cpu = [rate(runs, threads, kind, variant, rnd, "cpu_positions_per_s")
                           / rate(runs, threads, kind, "old", rnd, "cpu_positions_per_s") for rnd in range(args.rounds)]
                    cell[variant]["cpu_over_old_median"] = round(statistics.median(cpu), 2)
                    cell[variant]["first_loss_rel_diff_vs_old"] = abs(cell[variant]["first_loss"] - cell["old"]["first_loss"]) / abs(cell["old"]["first_loss"])
            summary[f"{kind}_threads{threads}"] = cell
    n_pos = sum(r.num_positions for r in records)
    sys.path.insert(0, str(ROOT))  # here, not at import: a --worker process must import the lkserve of its own tree
    from bench.layout import host_cpu

    result = {
        "summary": summary,
        "config": {"records": rec_info, "num_records": len(records), "positions": n_pos,
                   "batch_positions": args.batch_positions, "steps_per_process": args.steps, "rounds": args.rounds,
                   "threads": args.threads, "baseline": args.baseline, "variants": list(args.variants),
                   "loss": "lk_lambda", "K": 4, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                   "wall_s": round(time.time() - t_start, 1), "cpus": os.cpu_count(), "cpu": host_cpu(),
                   "load_avg_at_end": os.getloadavg()},
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
