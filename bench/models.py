"""How many target layers should the initial draft keep? Measured with transformers (fp32, CPU), JSON out.

For each N (draft = target's embeddings + first N layers + final norm + tied head, see lkserve.models.draft):

  alpha   expected acceptance at T=1, mean over answer positions of sum_v min(p_v, q_v), p = target, q = draft,
          with dense distributions; the answers are sampled from the target (T=1) for held-out MT-bench
          first turns (and HumanEval stubs), with the chat template. `greedy` is p(argmax q), the acceptance of
          vLLM's default greedy draft sampling.
  cost    c = draft decode-step time / target decode-step time (single sequence, KV cache, one thread, CPU
          time of the thread, interleaved, median: robust on a shared machine), plus wall-clock and FLOP
          ratios; v = target time for K+1 tokens / for 1 token (the verification step).
  trained optionally (--train-positions > 0): the same draft after a short distillation on other
          target-sampled answers (top-32 KL, decoder layers + norm trained, embeddings/head frozen, AdamW 3e-3,
          identical position budget for every N), then alpha on the same held-out answers.
  speedup S(K) = tau / (K c + v), tau = (1 - alpha^(K+1)) / (1 - alpha): expected tokens per target step over
          the time of K draft steps plus one verification, relative to plain decoding. The pick maximises S(K)
          averaged over the held-out domains (MT-bench, HumanEval), after training if it ran.

Run: .venv/bin/python bench/models.py [--layers 1 2 4 6] [--train-positions 16000] > result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_T0 = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - _T0:7.1f}s]", *args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data
def chat_texts(tokenizer, kind: str, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if kind == "mtbench":
            content = r["turns"][0]
        else:
            content = f"Complete the following Python function.\n```python\n{r['prompt']}```"
        out.append(
            tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                          add_generation_prompt=True)
        )
    return out


@torch.inference_mode()
def sample_answers(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, seed: int,
                   keep: str, top_k: int = 32) -> list[dict]:
    """Target-sample answers at T=1; keep the target's distribution at each answer position.

    keep="dense": full log-probs [T, V] (held-out evaluation); keep="topk": top-k ids + probs (training).
    Each item: prompt_ids [L], answer_ids [T] (up to and including the first EOS), and the distribution.
    """
    eos = tokenizer.eos_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    items: list[dict | None] = [None] * len(texts)
    tokenizer.padding_side = "left"
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + b)
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            output_logits=True, return_dict_in_generate=True, pad_token_id=eos, eos_token_id=eos,
        )
        L = enc["input_ids"].shape[1]
        gen = out.sequences[:, L:]
        logits = torch.stack(out.logits, dim=1).float()  # [B, T, V], raw = the T=1 distribution
        for row, i in enumerate(idx):
            toks = gen[row].tolist()
            n = toks.index(eos) + 1 if eos in toks else len(toks)
            prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()]
            lp = torch.log_softmax(logits[row, :n], dim=-1)
            item = {"prompt_ids": prompt.clone(), "answer_ids": gen[row, :n].clone()}
            if keep == "dense":
                item["target_logp"] = lp.clone()
            else:
                p, ids = lp.exp().topk(top_k, dim=-1)
                item["topk_ids"], item["topk_p"] = ids.to(torch.int32), p
            items[i] = item
        log(f"  sampled {min(b + batch_size, len(order))}/{len(order)}")
    return items  # type: ignore[return-value]


def batches(items: list[dict], batch_size: int):
    """Right-padded [prompt + answer] batches with the positions whose logits predict answer tokens."""
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        seqs = [torch.cat([it["prompt_ids"], it["answer_ids"]]) for it in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows, cols = [], []
        for r, (s, it) in enumerate(zip(seqs, chunk)):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
            L, T = len(it["prompt_ids"]), len(it["answer_ids"])
            rows += [r] * T
            cols += list(range(L - 1, L + T - 1))  # logits at position t predict token t+1
        yield chunk, ids, mask, torch.tensor(rows), torch.tensor(cols)


def answer_logits(model, ids, mask, rows, cols):
    """Hidden states for the whole batch, LM head only at answer positions: [P, V]."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[rows, cols])


@torch.inference_mode()
def acceptance(model, items: list[dict], batch_size: int = 4) -> dict:
    """Mean over answer positions of sum min(p, q) (T=1) and of p(argmax q) (greedy draft)."""
    tot_alpha = tot_greedy = 0.0
    n = 0
    per_answer = []
    for chunk, ids, mask, rows, cols in batches(items, batch_size):
        q = torch.softmax(answer_logits(model, ids, mask, rows, cols).float(), dim=-1)
        p = torch.cat([it["target_logp"] for it in chunk]).exp()
        a = torch.minimum(p, q).sum(-1)
        g = p.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
        tot_alpha += a.sum().item()
        tot_greedy += g.sum().item()
        n += len(a)
        off = 0
        for it in chunk:
            T = len(it["answer_ids"])
            per_answer.append(a[off : off + T].mean().item())
            off += T
    return {"alpha": tot_alpha / n, "greedy": tot_greedy / n, "positions": n,
            "alpha_answer_stdev": statistics.pstdev(per_answer)}


# ----------------------------------------------------------------------------------------------- cost
@torch.inference_mode()
def step_times(models: dict, prompt_ids: torch.Tensor, steps: int, repeats: int, verify_tokens: int) -> dict:
    """Per-step decode cost (batch 1, KV cache) of every model, interleaved so CPU load drifts cancel.

    Timed single-threaded with the thread's CPU time (`time.thread_time`), which other processes on a
    shared, oversubscribed machine do not inflate; wall-clock medians are reported beside it.
    Returns {name: (cpu_seconds, wall_seconds)} medians; "target_verify" is the target fed K+1 tokens.
    """
    from transformers import DynamicCache

    def decode(model, n_tokens_per_step: int) -> tuple[float, float]:
        cache = DynamicCache()
        out = model(input_ids=prompt_ids[None], past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cpu, wall = [], []
        for _ in range(steps):
            inp = nxt.repeat(1, n_tokens_per_step)
            c0, w0 = time.thread_time(), time.perf_counter()
            out = model(input_ids=inp, past_key_values=cache, use_cache=True)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if n_tokens_per_step > 1:  # keep the cache length as in single-token decoding
                cache.crop(-(n_tokens_per_step - 1))
        return statistics.median(cpu), statistics.median(wall)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        res["target_verify"] = []
        for m in models.values():  # warm-up
            decode(m, 1)
        for _ in range(repeats):
            for name, m in models.items():
                res[name].append(decode(m, 1))
            res["target_verify"].append(decode(models["target"], verify_tokens))
    finally:
        torch.set_num_threads(threads)
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in res.items()}


def flops_per_token(cfg: dict, num_layers: int) -> float:
    """Matmul MACs per decoded token (attention over the context ignored: short contexts)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return num_layers * per_layer + h * v


# ----------------------------------------------------------------------------------------------- training
def train_draft(model, items: list[dict], positions_budget: int, batch_size: int, lr: float, seed: int,
                warmup_steps: int = 8) -> dict:
    """Top-k forward-KL distillation of the decoder layers + final norm (embeddings / tied head frozen).

    AdamW, linear warm-up to `lr` then constant, gradient clipping 1.0. Without the warm-up the first full-size
    Adam steps at 3e-3 wreck a 4- or 6-layer draft (loss 12 -> 24) and a short budget never recovers.
    """
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if ".layers." in n or n == "model.norm.weight"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    model.train()
    rng = random.Random(seed)
    seen, steps, t0, losses = 0, 0, time.perf_counter(), []
    while seen < positions_budget:
        order = items[:]
        rng.shuffle(order)
        for chunk, ids, mask, rows, cols in batches(order, batch_size):
            logq = torch.log_softmax(answer_logits(model, ids, mask, rows, cols).float(), dim=-1)
            tids = torch.cat([it["topk_ids"] for it in chunk]).long()
            tp = torch.cat([it["topk_p"] for it in chunk])
            loss = -(tp * logq.gather(-1, tids)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            seen += len(rows)
            steps += 1
            losses.append(loss.item())
            if seen >= positions_budget:
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dt = time.perf_counter() - t0
    return {"positions": seen, "steps": steps, "seconds": round(dt, 1), "positions_per_s": round(seen / dt, 1),
            "loss_first": round(statistics.mean(losses[:5]), 3), "loss_last": round(statistics.mean(losses[-5:]), 3)}


# ----------------------------------------------------------------------------------------------- speed-up
def tau(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def speedup(alpha: float, c: float, v: float, k: int) -> float:
    return tau(alpha, k) / (k * c + v)


def breakeven_alpha(c: float, v: float, k: int) -> float:
    lo, hi = 0.0, 1.0
    if speedup(1.0, c, v, k) < 1:
        return math.nan
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid, c, v, k) < 1 else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 6])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--eval-mtbench", type=int, default=32)
    ap.add_argument("--eval-humaneval", type=int, default=16)
    ap.add_argument("--train-mtbench", type=int, default=48, help="the MT-bench questions not held out")
    ap.add_argument("--train-humaneval", type=int, default=48)
    ap.add_argument("--train-positions", type=int, default=16000, help="0 = skip the training experiment")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--timing-steps", type=int, default=24)
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="prompt split and sampling")
    ap.add_argument("--train-seed", type=int, default=0, help="training batch order")
    ap.add_argument("--train-batch", type=int, default=4, help="answers per training step (~250 positions)")
    ap.add_argument("--train-lr", type=float, default=3e-3)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lkserve.config import Settings
    from lkserve.models.draft import derive_draft
    from lkserve.models.smollm2 import prepare_target
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    cache_dir = args.cache_dir or Settings().cache_dir
    t0 = time.perf_counter()
    target_dir = prepare_target(cache_dir)
    log(f"target ready in {time.perf_counter() - t0:.1f} s: {target_dir}")
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    cfg = json.loads((target_dir / "config.json").read_text())

    rng = random.Random(args.seed)
    mt, he = mtbench_prompts(), humaneval_prompts()
    rng.shuffle(mt)
    rng.shuffle(he)
    eval_sets = {"mtbench": mt[: args.eval_mtbench], "humaneval": he[: args.eval_humaneval]}
    train_rows = {"mtbench": mt[args.eval_mtbench : args.eval_mtbench + args.train_mtbench],
                  "humaneval": he[args.eval_humaneval : args.eval_humaneval + args.train_humaneval]}

    # Samples are cached: they depend only on the target, the prompts and the seed.
    key = hashlib.sha256(json.dumps([str(target_dir), args.seed, args.max_new_tokens,
                                     [[r.get("question_id", r.get("task_id")) for r in v]
                                      for v in (*eval_sets.values(), *train_rows.values())],
                                     args.train_positions > 0]).encode()).hexdigest()[:16]
    sample_file = Path(cache_dir) / "bench" / f"models-samples-{key}.pt"
    t0 = time.perf_counter()
    if sample_file.is_file():
        samples = torch.load(sample_file)
        log(f"samples loaded from {sample_file}")
    else:
        samples = {"eval": {}, "train": []}
        for kind, rows in eval_sets.items():
            if rows:
                log(f"sampling {len(rows)} held-out {kind} answers")
                samples["eval"][kind] = sample_answers(target, tok, chat_texts(tok, kind, rows),
                                                       args.max_new_tokens, args.sample_batch, args.seed, keep="dense")
        if args.train_positions > 0:
            for kind, rows in train_rows.items():
                log(f"sampling {len(rows)} training {kind} answers")
                samples["train"] += sample_answers(target, tok, chat_texts(tok, kind, rows),
                                                   args.max_new_tokens, args.sample_batch, args.seed + 1,
                                                   keep="topk")
        sample_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(samples, sample_file)
    sampling_s = time.perf_counter() - t0

    result: dict = {
        "target": str(target_dir), "k": args.k, "dtype": "float32", "threads": torch.get_num_threads(),
        "eval_answers": {k: len(v) for k, v in samples["eval"].items()},
        "eval_positions": {k: sum(len(it["answer_ids"]) for it in v) for k, v in samples["eval"].items()},
        "train_positions_available": sum(len(it["answer_ids"]) for it in samples["train"]),
        "sampling_seconds": round(sampling_s, 1),
    }
    # Sanity check of the alignment: the target as its own draft must give alpha = 1.
    probe = samples["eval"]["mtbench"][:4]
    result["target_self_alpha"] = round(acceptance(target, probe)["alpha"], 5)
    log(f"target self-alpha on 4 answers: {result['target_self_alpha']}")

    rows_out = []
    with tempfile.TemporaryDirectory(prefix="lkserve-drafts-") as tmp:
        drafts = {}
        for n in args.layers:
            d = derive_draft(target_dir, Path(tmp) / f"L{n}", num_layers=n)
            drafts[n] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

        log("timing decode steps")
        t0 = time.perf_counter()
        prompt = samples["eval"]["mtbench"][0]["prompt_ids"]
        timed = step_times({"target": target, **{f"L{n}": m for n, m in drafts.items()}}, prompt,
                           args.timing_steps, args.timing_repeats, args.k + 1)
        result["timing_seconds"] = round(time.perf_counter() - t0, 1)
        t_target = timed["target"][0]
        v = timed["target_verify"][0] / t_target
        result["target_step_cpu_ms"] = round(1000 * t_target, 2)
        result["target_step_wall_ms"] = round(1000 * timed["target"][1], 2)
        result["target_verify_cpu_ms"] = round(1000 * timed["target_verify"][0], 2)
        result["verify_ratio_v"] = round(v, 3)
        result["verify_ratio_v_wall"] = round(timed["target_verify"][1] / timed["target"][1], 3)
        f_target = flops_per_token(cfg, cfg["num_hidden_layers"])

        for n, model in drafts.items():
            t0 = time.perf_counter()
            row: dict = {"layers": n}
            row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            row["step_cpu_ms"] = round(1000 * timed[f"L{n}"][0], 2)
            row["cost_ratio_c"] = round(timed[f"L{n}"][0] / t_target, 3)
            row["cost_ratio_c_wall"] = round(timed[f"L{n}"][1] / timed["target"][1], 3)
            row["flop_ratio"] = round(flops_per_token(cfg, n) / f_target, 3)
            for kind, items in samples["eval"].items():
                acc = acceptance(model, items)
                row[f"alpha_{kind}_untrained"] = round(acc["alpha"], 4)
                row[f"greedy_{kind}_untrained"] = round(acc["greedy"], 4)
            if args.train_positions > 0:
                log(f"training L{n} for {args.train_positions} positions")
                row["training"] = train_draft(model, samples["train"], args.train_positions, args.train_batch,
                                             args.train_lr, args.train_seed)
                for kind, items in samples["eval"].items():
                    acc = acceptance(model, items)
                    row[f"alpha_{kind}_trained"] = round(acc["alpha"], 4)
                    row[f"greedy_{kind}_trained"] = round(acc["greedy"], 4)
            c = row["cost_ratio_c"]
            row["breakeven_alpha_K"] = round(breakeven_alpha(c, v, args.k), 3)
            for phase in ("untrained", "trained"):
                per_domain = {kind: speedup(row[f"alpha_{kind}_{phase}"], c, v, args.k)
                              for kind in samples["eval"] if f"alpha_{kind}_{phase}" in row}
                if per_domain:
                    for kind, sp in per_domain.items():
                        row[f"speedup_K_{kind}_{phase}"] = round(sp, 3)
                    # the pick criterion: traffic mixes chat and code, so average the domains
                    row[f"speedup_K_{phase}"] = round(statistics.mean(per_domain.values()), 3)
                    a = row[f"alpha_mtbench_{phase}"]
                    row[f"speedup_by_K_mtbench_{phase}"] = {k: round(speedup(a, c, v, k), 3) for k in range(1, 7)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            log(json.dumps(row))
            rows_out.append(row)
    result["drafts"] = rows_out
    phase = "trained" if args.train_positions > 0 else "untrained"
    best = max(rows_out, key=lambda r: r[f"speedup_K_{phase}"])
    result["pick"] = {"layers": best["layers"], "by": f"speedup_K_{phase} (mean over the held-out domains)"}
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
