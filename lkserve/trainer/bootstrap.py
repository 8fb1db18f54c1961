"""`lkserve draft bootstrap`: the offline phase of the worker, so serving starts from a draft worth serving.

Same code as the online loop, in three steps:

    prompts  -> MT-bench + HumanEval from the installed data wheels (lkserve.prompts), split by prompt into train and
                held-out (never trained on). Reserved for evaluation only, never read here: Python's standard-library
                source and Debian package metadata.
    records  -> the target's own generations through lkserve's Engine (vLLM, many requests in flight at once) with
                capture on: the very VerificationRecords serving produces (memory sink, drained per batch).
    train    -> the worker's ops (lkserve.trainer.drafts.ops_for: DraftTrainer / Eagle3Trainer, LK-lambda by default)
                for a budget in positions and/or minutes; held-out alpha through the same gate evaluation.
    register -> lkserve.trainer.publish.publish into the worker's registry (sha256, config, dtype of the base), so
                `lkserve serve` and the worker start from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
import uuid
from dataclasses import dataclass, field

from lkserve.trainer.examples import split_by_positions


@dataclass
class BootstrapResult:
    version: str | None
    before: dict
    after: dict
    steps: int
    positions_trained: int
    train_records: int
    heldout_records: int
    generate_seconds: float
    train_seconds: float
    history: list = field(default_factory=list)


def prompt_texts() -> list[tuple[str, str]]:
    """(key, text) of every bootstrap prompt: the first turn of each MT-bench question and each HumanEval stub.
    Only these installed data wheels are read (the reserved domains never are: tests/test_bootstrap.py)."""
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    out = [(f"mtbench/{q['question_id']}", q["turns"][0]) for q in mtbench_prompts()]
    out += [(t["task_id"], t["prompt"]) for t in humaneval_prompts()]
    return out


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    """Stable split by prompt key (a hash, so adding prompts never moves an old one across the split)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_prompts(prompts: list[tuple[str, str]], heldout_fraction: float, seed: int):
    train = [p for p in prompts if not is_heldout(p[0], heldout_fraction, seed)]
    held = [p for p in prompts if is_heldout(p[0], heldout_fraction, seed)]
    return train, held


def encode(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """The chat template's user turn when the tokenizer has one (what a served chat request looks like), else the
    raw text; the last `max_prompt_tokens` tokens."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = list(tokenizer(text)["input_ids"])
    return ids[-max_prompt_tokens:]


async def generate_records(engine, prompts: list[list[int]], *, max_tokens: int, temperature: float, seed: int,
                           concurrency: int = 16) -> list:
    """The capture records of `prompts` served by `engine` (capture on, memory sink), `concurrency` at a time."""
    from lkserve.engine.engine import sampling_params

    async def one(i: int, ids: list[int]):
        # no per-request seed: vLLM 0.32's CPU engine core dies on a seeded request whose prefill is chunked
        # ("CPU Generator does not use offset"); the engine's own seed still fixes the run's sampling
        sp = sampling_params(temperature=temperature, max_tokens=max_tokens)
        async for _ in engine.generate(ids, sp, f"boot-{uuid.uuid4().hex[:12]}"):
            pass

    records = []
    await engine.drain_capture()  # nothing from before belongs to this run
    for a in range(0, len(prompts), concurrency):
        await asyncio.gather(*(one(a + j, p) for j, p in enumerate(prompts[a: a + concurrency])))
        records.extend(await engine.drain_capture())
    return records


def _progress(step: int, positions: int, rate: float, alpha: float | None, eta: float | None) -> None:
    a = "-" if alpha is None else f"{alpha:.4f}"
    e = "-" if eta is None else f"{eta:.0f}s"
    print(f"bootstrap step {step} positions {positions} ({rate:.0f}/s) held-out alpha {a} ETA {e}",
          file=sys.stderr, flush=True)


def train(ops, trainer, train_records: list, heldout_records: list, *, batch_positions: int,
          max_positions: int | None = None, max_minutes: float | None = None, eval_every_steps: int = 20,
          seed: int = 0, progress=_progress) -> tuple[list, int]:
    """Passes over `train_records` (shuffled each pass, seeded) in steps of ~`batch_positions`, until
    `max_positions` trained or `max_minutes` spent (at least one step). Returns (history of held-out evals,
    positions trained). Held-out records are only evaluated."""
    import random

    if max_positions is None and max_minutes is None:
        raise ValueError("a bootstrap needs a budget: max_positions and/or max_minutes")
    rng = random.Random(seed)
    t0 = time.perf_counter()
    done, history, last_alpha = 0, [], None
    usable = [r for r in train_records if r.num_positions]
    if not usable:
        raise ValueError("no training positions in the bootstrap records")

    def spent() -> bool:
        return (max_positions is not None and done >= max_positions) or \
            (max_minutes is not None and time.perf_counter() - t0 >= 60 * max_minutes)

    while not spent():
        order = usable[:]
        rng.shuffle(order)
        stepped = False
        for group in split_by_positions(order, batch_positions):
            try:
                batch = ops.batch(group)
            except ValueError:  # e.g. only position-0 rows, or a head's records without hidden states
                continue
            trainer.step(batch)
            stepped = True
            done += sum(r.num_positions for r in group)
            rate = done / max(1e-9, time.perf_counter() - t0)
            if trainer.step_count % eval_every_steps == 0:
                res = ops.evaluate(trainer.model, heldout_records)
                last_alpha = res.alpha_mean
                history.append({"step": trainer.step_count, "positions": done, **res.as_dict()})
            eta = None
            if max_positions is not None:
                eta = max(0.0, (max_positions - done) / max(rate, 1e-9))
            if max_minutes is not None:
                left = 60 * max_minutes - (time.perf_counter() - t0)
                eta = max(0.0, left) if eta is None else min(eta, max(0.0, left))
            progress(trainer.step_count, done, rate, last_alpha, eta)
            if spent():
                break
        if not stepped:
            raise ValueError("no usable training batch in the bootstrap records")
    return history, done


def bootstrap_records(settings, registry, train_records: list, heldout_records: list, *,
                      max_positions: int | None = None, max_minutes: float | None = None, seed: int = 0,
                      announce: bool = True, generate_seconds: float = 0.0, progress=_progress,
                      extra_metadata: dict | None = None) -> BootstrapResult:
    """Train the worker's draft (settings.engine.method, settings.trainer knobs) from settings.engine.draft_model on
    bootstrap records, then register (and announce) it as the next version of the worker's registry."""
    import torch

    from lkserve.trainer.drafts import ops_for
    from lkserve.trainer.publish import publish, register_base
    from lkserve.trainer.train import set_threads

    torch.manual_seed(seed)
    set_threads(settings.trainer.threads)
    ops = ops_for(settings)
    base = settings.engine.draft_model
    trainer = ops.trainer(base)
    before = ops.evaluate(trainer.model, heldout_records).as_dict()
    t0 = time.perf_counter()
    history, done = train(ops, trainer, train_records, heldout_records,
                          batch_positions=settings.trainer.batch_positions, max_positions=max_positions,
                          max_minutes=max_minutes, eval_every_steps=settings.trainer.eval_every_steps, seed=seed,
                          progress=progress)
    train_seconds = time.perf_counter() - t0
    after = ops.evaluate(trainer.model, heldout_records).as_dict()
    register_base(registry, base, settings.trainer.base_version)
    meta = publish(registry, trainer.model, base, settings.cache_dir, save=ops.save, announce=announce, metadata={
        "method": settings.engine.method, "loss": settings.trainer.loss, "eta": settings.trainer.eta,
        "step": trainer.step_count, "positions_trained": done, "bootstrap": True, "seed": seed,
        "heldout_alpha_before": before["alpha_mean"], "heldout_alpha_after": after["alpha_mean"],
        "heldout_tau_before": before["tau"], "heldout_tau_after": after["tau"], "heldout_rows": after["rows"],
        "parent": settings.trainer.base_version, "train_params": settings.trainer.train_params,
        **(extra_metadata or {}),
    })
    return BootstrapResult(meta["version"], before, after, trainer.step_count, done, len(train_records),
                           len(heldout_records), generate_seconds, train_seconds, history)


async def capture_split(engine, *, heldout_fraction: float = 0.2, max_prompts: int | None = None,
                        max_tokens: int = 128, temperature: float = 1.0, max_prompt_tokens: int = 256,
                        concurrency: int = 16, seed: int = 0):
    """(train records, held-out records, seconds) of the bootstrap prompts served by `engine`."""
    train_p, held_p = split_prompts(prompt_texts(), heldout_fraction, seed)
    if max_prompts is not None:
        n_held = max(1, round(max_prompts * heldout_fraction))
        train_p, held_p = train_p[: max_prompts - n_held], held_p[:n_held]
    enc = lambda ps: [encode(engine.tokenizer, t, max_prompt_tokens) for _, t in ps]
    t0 = time.perf_counter()
    kw = {"max_tokens": max_tokens, "temperature": temperature, "concurrency": concurrency}
    train_r = await generate_records(engine, enc(train_p), seed=seed, **kw)
    held_r = await generate_records(engine, enc(held_p), seed=seed + 1_000_000, **kw)
    return train_r, held_r, time.perf_counter() - t0


def run_bootstrap(settings, registry, *, max_positions: int | None = None, max_minutes: float | None = None,
                  seed: int = 0, announce: bool = True, **capture_kw) -> BootstrapResult:
    """The CLI: an in-process engine serving settings.engine (capture on, memory sink) captures, is stopped (the
    CPU is the trainer's then), and the draft is trained and registered. `capture_kw`: capture_split's."""
    from lkserve.engine.engine import Engine

    capture = settings.capture.model_copy(update={
        "enabled": True, "sample_rate": 1.0, "hidden_states": settings.engine.method == "eagle3"})

    async def go():
        engine = await Engine.create(settings.engine, capture, None, in_process=True)
        try:
            return await capture_split(engine, seed=seed, **capture_kw)
        finally:
            await engine.shutdown()

    train_r, held_r, gen_s = asyncio.run(go())
    return bootstrap_records(settings, registry, train_r, held_r, max_positions=max_positions,
                             max_minutes=max_minutes, seed=seed, announce=announce, generate_seconds=gen_s,
                             extra_metadata={"prompts": "mtbench+humaneval", **capture_kw})


def draft_vocab_from_records(records: list, vocab_size: int, size: int, always=()):
    """An EAGLE-3 truncated draft vocabulary from the bootstrap data itself: the `size` ids with the most expected
    target mass at the captured positions (sum of the logged top-k probabilities), `always` (special tokens) forced
    in, ascending. For `build_eagle3_head(..., draft_vocab_ids=...)`: a chat-and-code target's own output
    distribution, not a fixed corpus."""
    import numpy as np
    import torch

    counts = np.zeros(vocab_size, dtype=np.float64)
    for r in records:
        if not r.num_positions:
            continue
        ids = np.asarray(r.topk_ids, dtype=np.int64).ravel()
        probs = np.asarray(r.topk_probs, dtype=np.float64).ravel()
        ok = (ids >= 0) & (ids < vocab_size)
        np.add.at(counts, ids[ok], probs[ok])
    top = counts.max() + 1.0 if counts.size else 1.0
    for s in always:
        if s is not None and 0 <= s < vocab_size:
            counts[s] = top
    order = torch.argsort(torch.from_numpy(counts), descending=True, stable=True)[:size]
    return torch.sort(order).values
