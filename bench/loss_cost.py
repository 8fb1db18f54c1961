"""What training costs at production sizes: LK-λ / LK-α / TV vs KL step time, and EAGLE-3 head positions/s. JSON out.

    python bench/loss_cost.py [--device cpu|cuda] [--positions N] [--quick]

Pure PyTorch (no vLLM), so the same script runs on a GPU machine. Two parts:

1. Losses (issue 19.5): forward + backward of each loss w.r.t. the draft logits [N, V] (bf16 by default, upcast to
   fp32 inside the losses, as the trainer calls them), dense targets [N, V] and sparse top-k targets, through
   lkserve.losses. The losses are interleaved within each repetition, so load from other processes hits them alike
   and the ratios over KL stay meaningful on a shared machine. Production size: V = 128,256 (Llama 3), 8k positions;
   on a CPU the default is fewer positions (--positions), recorded in the JSON.
2. EAGLE-3 head training (lkserve.trainer.eagle3.Eagle3Trainer, fp32 AdamW as the worker runs it): random weights,
   synthetic capture records with hidden states (lkserve.capture.synthetic.random_record: the engine's shapes), timed
   `trainer.step(batch)` calls. Sizes: H = 4096 with a 32k draft vocabulary (a Llama-3-8B head) and the SmolLM2 head
   (H = 576, 8,192 ids). A "position" is a labelled (verified) position of a record; each gives up to K training rows
   (every TTT step). `positions_per_s` is of whole optimizer steps at the measured batch; `marginal_positions_per_s`
   leaves out the AdamW update (a fixed cost per step, timed inside trainer.step), i.e. what a larger batch
   approaches. One gateway's capture
   produces about one labelled position per served token, so replicas one worker keeps up with ~ positions/s over a
   gateway's tokens/s.

Writes bench/results/loss_cost.json unless --no-write (or when --out names another file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lkserve.capture.synthetic import random_record
from lkserve.losses import kl_loss, lk_alpha_loss, lk_lambda_loss, topk_target, tv_loss
from lkserve.models.eagle3_head import Eagle3Head, Eagle3Spec
from lkserve.trainer.eagle3 import Eagle3Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "loss_cost.json"
LOSSES = {"lk_lambda": lk_lambda_loss, "lk_alpha": lk_alpha_loss, "kl": kl_loss, "tv": tv_loss}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# EAGLE-3 heads (Eagle3Spec kwargs): a Llama-3-8B-sized head with a 32k draft vocabulary, and the SmolLM2 one
HEADS = {
    "h4096_v32k": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "draft_vocab_size": 32000,
                   "target_hidden_size": 4096, "aux_layer_ids": [2, 16, 29], "rope_theta": 500000.0},
    "smollm2_h576_v8k": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "draft_vocab_size": 8192,
                         "target_hidden_size": 576, "aux_layer_ids": [2, 15, 27], "rope_theta": 100000.0},
}
HEAD_BATCH = {  # (records, context tokens per record, labelled positions per record)
    "cuda": {"h4096_v32k": (8, 256, 128), "smollm2_h576_v8k": (8, 256, 128)},
    "cpu": {"h4096_v32k": (1, 64, 32), "smollm2_h576_v8k": (8, 256, 128)},
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ losses
def time_loss(fn, logits, target, position, device) -> tuple[float, float]:
    """(wall, process CPU) seconds of loss + backward w.r.t. the logits: the part of a training step the loss owns.
    On a shared CPU the CPU seconds are the steadier ratio (other jobs stretch the wall clock)."""
    logits.grad = None
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(logits, target, position).loss.backward()
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    logits.grad = None
    return seconds, cpu


def bench_losses(args, device: torch.device) -> dict:
    n, v, dtype = args.positions, args.vocab, DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    # [N, V] draft logits (dtype) and target probabilities (dtype: what a bf16 target hands over)
    logits = (torch.randn(n, v, generator=g, device=device) * 3).to(dtype).requires_grad_()
    dense = (torch.randn(n, v, generator=g, device=device) * 3).softmax(-1).to(dtype)
    sparse = topk_target(dense.float(), args.k)  # ids/probs [N, k] fp32, residual [N]
    position = torch.arange(n, device=device) % args.draft_len  # [N]
    out = {}
    for form, target in (("dense", dense), ("sparse", sparse)):
        runs = {name: [] for name in LOSSES}  # name -> [(wall, cpu)] per repetition
        for rep in range(args.warmup + args.reps):
            for name, fn in LOSSES.items():
                t = time_loss(fn, logits, target, position, device)
                if rep >= args.warmup:
                    runs[name].append(t)
        med = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
        out[form] = {
            "ms": {name: round(1000 * s, 2) for name, s in med.items()},
            "over_kl": {name: round(s / med["kl"], 3) for name, s in med.items() if name != "kl"},
            "positions_per_s": {name: round(n / s) for name, s in med.items()},
            "runs_ms": {name: [round(1000 * w, 1) for w, _ in r] for name, r in runs.items()},
        }
        if device.type == "cpu":
            cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
            out[form]["over_kl_cpu_seconds"] = {name: round(c / cpu["kl"], 3) for name, c in cpu.items()
                                                if name != "kl"}
        log(f"losses {form}: {out[form]['ms']} over KL {out[form]['over_kl']}")
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del logits, dense, sparse
    return out


# ------------------------------------------------------------------------------------------------ EAGLE-3 head
def synthetic_records(spec: Eagle3Spec, records: int, context: int, positions: int, num_steps: int, seed: int):
    """Capture records with the engine's shapes: top-32 targets, [context - 1, n_aux * H_t] bf16 hidden states."""
    rng = np.random.default_rng(seed)
    return [random_record(rng, num_positions=positions, context_len=context, vocab_size=spec.vocab_size,
                          num_speculative_tokens=num_steps, hidden_dim=spec.num_aux * spec.target_hidden_size)
            for _ in range(records)]


def bench_head(name: str, args, device: torch.device) -> dict:
    spec = Eagle3Spec(**HEADS[name])
    records, context, positions = HEAD_BATCH[device.type][name]
    if args.quick:
        records = max(1, records // 2)
    torch.manual_seed(0)
    head = Eagle3Head(spec).to(device)
    rng = np.random.default_rng(0)
    head.set_draft_vocab(torch.from_numpy(np.sort(rng.choice(spec.vocab_size, spec.draft_vocab_size, replace=False))))
    trainer = Eagle3Trainer(head, loss="lk_lambda", num_steps=args.draft_len, lr=1e-4)
    batch = trainer.make_batch(synthetic_records(spec, records, context, positions, args.draft_len, seed=0))
    batch = type(batch)(**{k: (x.to(device) if torch.is_tensor(x) else
                               type(x)(*(t.to(device) for t in x)) if isinstance(x, tuple) else x)
                           for k, x in vars(batch).items()})
    n_pos = records * positions
    steps, opt = [], []
    timed_opt = []  # seconds of each AdamW update, from inside trainer.step
    update = trainer.optimizer.step

    def optimizer_step(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = update(*a, **kw)
        sync(device)
        timed_opt.append(time.perf_counter() - t0)
        return out

    trainer.optimizer.step = optimizer_step
    for rep in range(args.head_warmup + args.head_reps):
        sync(device)
        t0 = time.perf_counter()
        trainer.step(batch)  # loss, backward, clip, AdamW: what the worker does per batch
        sync(device)
        if rep >= args.head_warmup:
            steps.append(time.perf_counter() - t0)
            opt.append(timed_opt[-1])
    step_s, opt_s = statistics.median(steps), statistics.median(opt)
    fb_s = step_s - opt_s  # forward, backward and gradient clipping
    trainable = sum(p.numel() for p in head.trainable_parameters())
    res = {"spec": {k: HEADS[name][k] for k in ("hidden_size", "intermediate_size", "vocab_size", "draft_vocab_size")},
           "trainable_parameters": trainable, "records": records, "context_tokens_per_record": context,
           "labelled_positions": n_pos, "training_rows": batch.num_rows, "ttt_steps": args.draft_len,
           "step_s": round(step_s, 3), "fwd_bwd_clip_s": round(fb_s, 3), "adamw_update_s": round(opt_s, 3),
           "positions_per_s": round(n_pos / step_s, 1), "marginal_positions_per_s": round(n_pos / fb_s, 1),
           "step_runs_s": [round(s, 3) for s in steps]}
    if device.type == "cuda":
        res["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    log(f"head {name}: {res}")
    del trainer, head, batch
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="draft logits and dense target")
    ap.add_argument("--positions", type=int, default=None, help="rows N (default: 8192 on cuda, 1024 on cpu)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--k", type=int, default=32, help="sparse target: top-k")
    ap.add_argument("--draft-len", type=int, default=4, help="K: draft positions (TTT steps)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--head-reps", type=int, default=2)
    ap.add_argument("--head-warmup", type=int, default=1)
    ap.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--quick", action="store_true", help="a quarter of the positions, half the head records")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.positions is None:
        args.positions = 8192 if device.type == "cuda" else 1024
    if args.quick:
        args.positions = max(64, args.positions // 4)
    t0 = time.perf_counter()
    config = {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "loss_dtype": args.dtype, "positions": args.positions, "vocab": args.vocab, "top_k": args.k,
              "draft_len": args.draft_len, "reps": args.reps, "warmup": args.warmup, "head_dtype": "fp32",
              "head_optimizer": "AdamW", "head_loss": "lk_lambda", "head_reps": args.head_reps,
              "command": " ".join(["bench/loss_cost.py", *sys.argv[1:]])}
    if device.type != "cuda":
        config["note"] = (f"CPU run: {args.positions} positions instead of the production 8,192, and the H=4096 head "
                          f"on a batch of {HEAD_BATCH['cpu']['h4096_v32k']} (records, context, positions); the ratios "
                          "are the result, absolute GPU figures were not measured (no GPU lent this session). "
                          "`--device cuda` runs the production sizes.")
    result = {"config": config, "losses": bench_losses(args, device), "eagle3_head": {}}
    for name in args.heads:
        result["eagle3_head"][name] = bench_head(name, args, device)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    if not args.no_write:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
