"""Forward + backward time of LK-lambda and LK-alpha vs KL on one batch, dense and sparse (top-k) targets.

    python bench/losses.py [--positions 4096] [--vocab 49152] [--k 32] [--reps 3] [--warmup 1]

Prints ONE JSON line: median wall seconds per loss and target form, and the LK/KL ratios (of wall and CPU time).
Memory: a few [positions, vocab] fp32 tensors (0.8 GB each at the defaults); peak ~6 GB. On 2 busy CPU cores one
dense LK-lambda call at the defaults takes ~10-20 s, so the whole run takes a few minutes; lower --positions
or --reps for a quick look.
"""

import argparse
import json
import statistics
import time

import torch

from lkserve.losses import kl_loss, lk_alpha_loss, lk_lambda_loss, topk_target

LOSSES = {"lk_lambda": lk_lambda_loss, "lk_alpha": lk_alpha_loss, "kl": kl_loss}


def time_once(loss_fn, logits, target, position):
    """(wall, process CPU) seconds of loss + backward w.r.t. the logits: the part of a step the loss owns."""
    logits.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    loss_fn(logits, target, position).loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logits.grad = None
    return wall, cpu


def time_losses(logits, target, position, reps, warmup):
    """Median (wall, cpu) per loss. The losses are interleaved within each repetition, so load from other
    processes on a shared machine hits them alike and the LK/KL ratios stay meaningful."""
    for _ in range(warmup):
        for fn in LOSSES.values():
            time_once(fn, logits, target, position)
    runs = {name: [] for name in LOSSES}  # name -> [(wall, cpu)] per repetition
    for _ in range(reps):
        for name, fn in LOSSES.items():
            runs[name].append(time_once(fn, logits, target, position))
    return {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for name, r in runs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--draft-len", type=int, default=6, help="K: draft positions the rows are spread over")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    n, v = args.positions, args.vocab
    logits = torch.randn(n, v, generator=g).mul_(3).requires_grad_()  # [N, V] fp32 draft logits
    dense = torch.randn(n, v, generator=g).mul_(3).softmax(-1)  # [N, V] fp32 target probabilities
    sparse = topk_target(dense, args.k)  # ids/probs [N, k], residual [N]
    position = torch.arange(n) % args.draft_len  # [N]

    result = {"positions": n, "vocab": v, "k": args.k, "reps": args.reps, "threads": torch.get_num_threads()}
    for form, target in (("dense", dense), ("sparse", sparse)):
        times = time_losses(logits, target, position, args.reps, args.warmup)
        for name, (wall, _) in times.items():
            result[f"{form}_{name}_s"] = round(wall, 4)
        for name in ("lk_lambda", "lk_alpha"):  # ratios of wall time, and of CPU time (less noisy when shared)
            result[f"{form}_{name}_over_kl"] = round(times[name][0] / times["kl"][0], 3)
            result[f"{form}_{name}_over_kl_cpu"] = round(times[name][1] / times["kl"][1], 3)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
