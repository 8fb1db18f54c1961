"""`lkserve draft bootstrap`: the offline phase of the worker, so serving starts from a draft worth serving.

Same code as the online loop, in three steps:

    prompts  -> MT-bench + HumanEval from the installed data wheels (lkserve.prompts), split by prompt into train and
                held-out (never trained on). Reserved for evaluation only, never read here: Python's standard-library
                source and Debian package metadata.
    records  -> source "teacher" (default): the target's own completions from an engine without speculation (vLLM,
                many streams), then one teacher-forced target pass per window (lkserve.trainer.teacher), a label at
                every position, in the VerificationRecord format; source "served": a spec-decoding engine with
                capture on, the very records serving produces (memory sink, drained per batch), a label only at
                verified draft positions. bench/bootstrap_sources.py measures which buys more per CPU-minute.
    train    -> the worker's ops (lkserve.trainer.drafts.ops_for: DraftTrainer / Eagle3Trainer, LK-lambda by default)
                for a budget in positions and/or minutes; held-out alpha through the same gate evaluation.
    register -> lkserve.trainer.publish.publish into the worker's registry (sha256, config, dtype of the base), so
                `lkserve serve` and the worker start from it.

Resumable, with a state directory (BootstrapState; the CLI's default <cache>/bootstrap/<method>-<seed>):

    records.lkvr        the captured train and held-out records (lkserve.capture.codec), written once after capture:
                        a rerun skips the capture
    head/               EAGLE-3 only: the new head rebuilt on a vocabulary chosen from records.lkvr (the training base)
    training-state.pt   lkserve.trainer.state.TrainingStateStore, at every held-out evaluation, at the end and on
                        Ctrl-C: trainer state (weights, optimizer, step), positions done, the shuffle RNG state at the
                        start of the current pass and the next group in it, so a resumed run trains on exactly the
                        batches the uninterrupted one would have
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field

from lkserve.trainer.examples import split_by_positions

SOURCES = ("teacher", "served")
LABELS = ("all", "completion")  # teacher_split: which positions are labels


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
    resumed_step: int = 0  # the step the run continued from (0: a fresh start)
    resumed_positions: int = 0
    vocab: dict | None = None  # EAGLE-3: where the draft vocabulary came from
    after_completion: dict | None = None  # held-out completions only (teacher records), what serving drafts


_RECORDS_MAGIC = b"LKRS"
_U32 = struct.Struct("<I")


class BootstrapState:
    """A bootstrap's state directory (see the module docstring). Nothing here is a registry version: publishing
    still goes through lkserve.trainer.publish."""

    RECORDS = "records.lkvr"
    HEAD = "head"

    def __init__(self, directory):
        from lkserve.trainer.state import TrainingStateStore

        self.dir = os.fspath(directory)
        self.store = TrainingStateStore(self.dir)

    def discard(self) -> None:
        """`--fresh`: forget the records, the rebuilt head and the training state."""
        import shutil

        for name in (self.RECORDS, self.store.path.name):
            if os.path.exists(self.path(name)):
                os.unlink(self.path(name))
        shutil.rmtree(self.path(self.HEAD), ignore_errors=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def save_records(self, train: list, heldout: list, meta: dict) -> None:
        """One file: magic, u32 header length, JSON header ({"train": n, "heldout": m, **meta}), then every record
        as u32 length + lkserve.capture.codec bytes (train first). Atomic (tmp + fsync + rename)."""
        import json

        from lkserve.capture.codec import encode

        header = json.dumps({"train": len(train), "heldout": len(heldout), **meta}).encode()
        tmp = self.path(f".{self.RECORDS}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(_RECORDS_MAGIC + _U32.pack(len(header)) + header)
            for r in (*train, *heldout):
                blob = encode(r)
                f.write(_U32.pack(len(blob)) + blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(self.RECORDS))

    def load_records(self):
        """(train, heldout, meta) from records.lkvr, None when there is none."""
        import json

        from lkserve.capture.codec import decode

        path = self.path(self.RECORDS)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            data = memoryview(f.read())
        if bytes(data[:4]) != _RECORDS_MAGIC:
            raise ValueError(f"{path}: not a bootstrap records file")
        (n,) = _U32.unpack_from(data, 4)
        meta = json.loads(bytes(data[8: 8 + n]))
        off, records = 8 + n, []
        while off < len(data):
            (m,) = _U32.unpack_from(data, off)
            records.append(decode(bytes(data[off + 4: off + 4 + m])))
            off += 4 + m
        n_train, n_held = int(meta.pop("train")), int(meta.pop("heldout"))
        if len(records) != n_train + n_held:
            raise ValueError(f"{path}: {len(records)} records, header says {n_train} + {n_held}")
        return records[:n_train], records[n_train:], meta

    def load_training(self) -> dict | None:
        return self.store.load()

    def save_training(self, state: dict) -> None:
        self.store.save(state)


def default_state_dir(settings, seed: int) -> str:
    return os.path.join(settings.cache_dir, "bootstrap", f"{settings.engine.method}-{seed}")


DOMAINS = ("mtbench", "humaneval")


def prompt_texts(domains: tuple[str, ...] = DOMAINS) -> list[tuple[str, str]]:
    """(key, text) of every bootstrap prompt of `domains`: "mtbench", the first turn of each MT-bench question (chat);
    "humaneval", each HumanEval stub (code). Only these installed data wheels are read (the reserved domains never
    are: tests/test_bootstrap.py). The demo bootstraps on ("mtbench",) only, so its HumanEval phase is a domain the
    bootstrapped draft has never seen."""
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    unknown = set(domains) - set(DOMAINS)
    if unknown or not domains:
        raise ValueError(f"bootstrap prompt domains must be a non-empty subset of {DOMAINS}, not {domains!r}")
    out = []
    if "mtbench" in domains:
        out += [(f"mtbench/{q['question_id']}", q["turns"][0]) for q in mtbench_prompts()]
    if "humaneval" in domains:
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


def bootstrap_prompts(heldout_fraction: float, max_prompts: int | None, seed: int,
                      domains: tuple[str, ...] = DOMAINS):
    """(train, held-out) prompts of the bootstrap: split_prompts of `domains`' prompts, cut to `max_prompts` in all
    (the held-out side keeps its fraction). A prompt's side does not depend on `domains` (a hash of its key)."""
    train_p, held_p = split_prompts(prompt_texts(tuple(domains)), heldout_fraction, seed)
    if max_prompts is not None:
        n_held = max(1, round(max_prompts * heldout_fraction))
        train_p, held_p = train_p[: max_prompts - n_held], held_p[:n_held]
    return train_p, held_p


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


def eval_sample(records: list, positions: int | None) -> list:
    """Every n-th record, n chosen so about `positions` labelled positions remain (all records when None or when
    they hold fewer): the in-training evaluations' held-out sample, spread over the whole split (its domains are in
    order)."""
    total = sum(r.num_positions for r in records)
    if positions is None or total <= positions:
        return records
    return records[::-(-total // positions)]


def train(ops, trainer, train_records: list, heldout_records: list, *, batch_positions: int,
          max_positions: int | None = None, max_minutes: float | None = None, eval_every_steps: int = 20,
          eval_positions: int | None = None, seed: int = 0, progress=_progress, resume: dict | None = None,
          save=None) -> tuple[list, int]:
    """Passes over `train_records` (shuffled each pass, seeded) in steps of ~`batch_positions`, until
    `max_positions` trained in total (counting the positions of `resume`) or `max_minutes` spent in this call
    (at least one step unless the positions are done already). Returns (history of held-out evals, positions
    trained in total). Held-out records are only evaluated: every `eval_every_steps` steps, on eval_sample(...,
    eval_positions) of them (None: all), so the progress line's held-out alpha does not cost a third of the training.

    `save(state)` is called at every evaluation, at the end and on KeyboardInterrupt (then re-raised) with what
    `resume` takes back: {"positions", "rng" (the shuffle RNG at the start of the current pass), "group" (the next
    group of that pass), "history"}; the caller adds the trainer's state. Resuming replays the pass's shuffle and
    skips the groups already trained: the same batches in the same order as a run that was never stopped."""
    import random

    if max_positions is None and max_minutes is None:
        raise ValueError("a bootstrap needs a budget: max_positions and/or max_minutes")
    rng = random.Random(seed)
    t0 = time.perf_counter()
    done, history, last_alpha, next_group = 0, [], None, 0
    if resume is not None:
        rng.setstate(resume["rng"])
        done, next_group, history = int(resume["positions"]), int(resume["group"]), list(resume["history"])
        last_alpha = history[-1]["alpha_mean"] if history else None
    done_at_start = done
    pass_rng = rng.getstate()
    usable = [r for r in train_records if r.num_positions]
    probe = eval_sample(heldout_records, eval_positions)
    if not usable:
        raise ValueError("no training positions in the bootstrap records")

    def spent() -> bool:
        return (max_positions is not None and done >= max_positions) or \
            (max_minutes is not None and time.perf_counter() - t0 >= 60 * max_minutes)

    def snapshot() -> dict:
        return {"positions": done, "rng": pass_rng, "group": next_group, "history": history}

    consistent = True  # False while a step is half applied (a Ctrl-C then saves nothing: the last save stands)
    try:
        while not spent():
            pass_rng = rng.getstate()
            order = usable[:]
            rng.shuffle(order)
            first, stepped = next_group, False
            for gi, group in enumerate(split_by_positions(order, batch_positions)):
                if gi < first:
                    continue
                next_group = gi + 1
                try:
                    batch = ops.batch(group)
                except ValueError:  # e.g. only position-0 rows, or a head's records without hidden states
                    continue
                consistent = False
                trainer.step(batch)
                done += sum(r.num_positions for r in group)
                consistent = True
                stepped = True
                rate = (done - done_at_start) / max(1e-9, time.perf_counter() - t0)
                if trainer.step_count % eval_every_steps == 0:
                    res = ops.evaluate(trainer.model, probe)
                    last_alpha = res.alpha_mean
                    history.append({"step": trainer.step_count, "positions": done, **res.as_dict()})
                    if save is not None:
                        save(snapshot())
                eta = None
                if max_positions is not None:
                    eta = max(0.0, (max_positions - done) / max(rate, 1e-9))
                if max_minutes is not None:
                    left = 60 * max_minutes - (time.perf_counter() - t0)
                    eta = max(0.0, left) if eta is None else min(eta, max(0.0, left))
                progress(trainer.step_count, done, rate, last_alpha, eta)
                if spent():
                    break
            else:  # the pass is over: a resume starts the next one
                pass_rng, next_group = rng.getstate(), 0
            if not stepped and first == 0:
                raise ValueError("no usable training batch in the bootstrap records")
    except KeyboardInterrupt:
        if save is not None and consistent:
            save(snapshot())
        raise
    if save is not None:
        save(snapshot())
    return history, done


def _fingerprint(settings, base, seed: int, train_records: list, heldout_records: list) -> dict:
    """What a saved training state must agree with to be resumed (else --fresh)."""
    t = settings.trainer
    return {"method": settings.engine.method, "base": str(base), "seed": seed, "loss": t.loss, "eta": t.eta,
            "lr": t.lr_for(settings.engine.method), "batch_positions": t.batch_positions,
            "train_params": t.train_params, "num_positions": settings.engine.num_speculative_tokens,
            "train_records": len(train_records), "heldout_records": len(heldout_records)}


def rebuild_head_vocab(base_dir, target_dir, records: list, out_dir, num_speculative_tokens: int) -> dict | None:
    """A new (untrained) EAGLE-3 head with a truncated vocabulary rebuilt on `records` (draft_vocab_from_records:
    the target's own output mass on the bootstrap data), same seed, init and architecture, saved at out_dir in the
    base's dtype. None (nothing written) when the base is not a new head of build_eagle3_head (a trained head keeps
    the vocabulary its weights were trained for) or has the full vocabulary. Returns where the vocabulary came from."""
    import json

    import torch

    from lkserve.checkpoint import atomic_dir, checkpoint_float_dtype
    from lkserve.models import eagle3 as e3

    info = e3.new_head_info(base_dir)
    with open(os.path.join(base_dir, "config.json")) as f:
        spec = e3.spec_from_config(json.load(f), target_dir)
    if info is None or not spec.truncated:
        return None
    ids = draft_vocab_from_records(records, spec.vocab_size, spec.draft_vocab_size, always=e3.special_ids(target_dir))
    head = e3.new_head(target_dir, int(info["seed"]), spec.draft_vocab_size, spec.aux_layer_ids,
                       float(info.get("init_std", 0.02)), draft_vocab_ids=ids, init=info.get("init", "target_head"))
    positions = sum(r.num_positions for r in records)
    source = f"bootstrap records ({len(records)} train records, {positions} positions)"
    with atomic_dir(out_dir, replace=True) as tmp:
        e3.save_head(head, tmp, target_dir, num_speculative_tokens, checkpoint_float_dtype(base_dir) or torch.float32)
        e3.write_new_head_info(tmp, seed=int(info["seed"]), init=info.get("init", "target_head"),
                               init_std=float(info.get("init_std", 0.02)), vocab_source=source)
    return {"source": source, "size": spec.draft_vocab_size, "replaced": info.get("vocab_source"),
            "base": str(base_dir)}


def bootstrap_records(settings, registry, train_records: list, heldout_records: list, *,
                      max_positions: int | None = None, max_minutes: float | None = None, seed: int = 0,
                      announce: bool = True, generate_seconds: float = 0.0, progress=_progress,
                      extra_metadata: dict | None = None, state_dir=None) -> BootstrapResult:
    """Train the worker's draft (settings.engine.method, settings.trainer knobs) from settings.engine.draft_model on
    bootstrap records, then register (and announce) it as the next version of the worker's registry.

    EAGLE-3: a new head (lkserve.models.eagle3.new_head_info) is first rebuilt on a vocabulary chosen from
    `train_records` (rebuild_head_vocab). With `state_dir` the training state is saved there (see the module
    docstring) and a saved one is resumed; it must come from the same settings, base and records (ValueError)."""
    import torch

    from lkserve.trainer.drafts import ops_for
    from lkserve.trainer.publish import publish, register_base
    from lkserve.trainer.train import set_threads

    torch.manual_seed(seed)
    set_threads(settings.trainer.threads)
    ops = ops_for(settings)
    start = settings.engine.draft_model
    state = BootstrapState(state_dir) if state_dir is not None else None
    base, vocab = start, None
    if settings.engine.method == "eagle3":
        import json
        import tempfile

        from lkserve.models.eagle3 import new_head_info

        os.makedirs(settings.cache_dir, exist_ok=True)
        head_dir = state.path(BootstrapState.HEAD) if state is not None else os.path.join(
            tempfile.mkdtemp(prefix=".bootstrap-head-", dir=settings.cache_dir), "head")
        if state is not None and os.path.isfile(os.path.join(head_dir, "config.json")):  # the resumed run's
            with open(os.path.join(head_dir, "config.json")) as f:
                size = json.load(f).get("draft_vocab_size")
            vocab = {"source": new_head_info(head_dir)["vocab_source"], "size": size,
                     "replaced": (new_head_info(start) or {}).get("vocab_source"), "base": str(start)}
        else:
            vocab = rebuild_head_vocab(start, settings.engine.target_model, train_records, head_dir,
                                       settings.engine.num_speculative_tokens)
        if vocab is not None:
            base = str(head_dir)
        else:
            if state is None:  # nothing was rebuilt into the temporary directory
                os.rmdir(os.path.dirname(head_dir))
            info = new_head_info(start)
            with open(os.path.join(start, "config.json")) as f:
                cfg = json.load(f)
            own = "the base head's own (trained) vocabulary"
            vocab = {"source": (info["vocab_source"] or "full vocabulary") if info else own,
                     "size": cfg.get("draft_vocab_size"), "base": str(start)}
    trainer = ops.trainer(base)
    fp = _fingerprint(settings, base, seed, train_records, heldout_records)
    saved = state.load_training() if state is not None else None
    resume = None
    if saved is not None:
        if saved["config"] != fp:
            diff = {k: (saved["config"].get(k), v) for k, v in fp.items() if saved["config"].get(k) != v}
            raise ValueError(f"{state.dir}: the saved bootstrap state was made with other settings {diff} "
                             "(saved, now); rerun with --fresh to discard it")
        trainer.load_state_dict(saved["trainer"])
        before, resume = saved["before"], saved["loop"]
    else:
        before = ops.evaluate(trainer.model, heldout_records).as_dict()
    resumed_step, resumed_positions = trainer.step_count, int(resume["positions"]) if resume else 0

    def save(loop: dict) -> None:
        state.save_training({"trainer": trainer.state_dict(), "loop": loop, "before": before, "config": fp,
                             "saved_at": time.time()})

    t0 = time.perf_counter()
    history, done = train(ops, trainer, train_records, heldout_records,
                          batch_positions=settings.trainer.batch_positions, max_positions=max_positions,
                          max_minutes=max_minutes, eval_every_steps=settings.trainer.eval_every_steps,
                          eval_positions=settings.trainer.bootstrap_eval_positions, seed=seed,
                          progress=progress, resume=resume, save=save if state is not None else None)
    train_seconds = time.perf_counter() - t0
    after = ops.evaluate(trainer.model, heldout_records).as_dict()
    from lkserve.trainer.teacher import completion_labels

    held_c = completion_labels(heldout_records)  # a prompt's positions are prefilled, never drafted
    after_c = ops.evaluate(trainer.model, held_c).as_dict() if held_c else None
    register_base(registry, start, settings.trainer.base_version)
    meta = publish(registry, trainer.model, base, settings.cache_dir, save=ops.save, announce=announce, metadata={
        "method": settings.engine.method, "loss": settings.trainer.loss, "eta": settings.trainer.eta,
        "step": trainer.step_count, "positions_trained": done, "bootstrap": True, "seed": seed,
        "heldout_alpha_before": before["alpha_mean"], "heldout_alpha_after": after["alpha_mean"],
        "heldout_tau_before": before["tau"], "heldout_tau_after": after["tau"], "heldout_rows": after["rows"],
        **({"heldout_completion_alpha_after": after_c["alpha_mean"], "heldout_completion_tau_after": after_c["tau"],
            "heldout_completion_rows": after_c["rows"]} if after_c else {}),
        "parent": settings.trainer.base_version, "train_params": settings.trainer.train_params,
        "precision": settings.trainer.precision, "threads": settings.trainer.threads,
        "resumed_from_step": resumed_step, **({"draft_vocab": vocab} if vocab is not None else {}),
        **(extra_metadata or {}),
    })
    if state is None and base != start:  # the rebuilt head of a stateless run: the version holds what serves
        import shutil

        shutil.rmtree(os.path.dirname(base), ignore_errors=True)
    return BootstrapResult(meta["version"], before, after, trainer.step_count, done, len(train_records),
                           len(heldout_records), generate_seconds, train_seconds, history, resumed_step,
                           resumed_positions, vocab, after_c)


async def capture_split(engine, *, heldout_fraction: float = 0.2, max_prompts: int | None = None,
                        max_tokens: int = 128, temperature: float = 1.0, max_prompt_tokens: int = 256,
                        concurrency: int = 16, seed: int = 0, domains: tuple[str, ...] = DOMAINS):
    """(train records, held-out records, seconds) of the bootstrap prompts (of `domains`) served by `engine`."""
    train_p, held_p = bootstrap_prompts(heldout_fraction, max_prompts, seed, domains)
    enc = lambda ps: [encode(engine.tokenizer, t, max_prompt_tokens) for _, t in ps]
    t0 = time.perf_counter()
    kw = {"max_tokens": max_tokens, "temperature": temperature, "concurrency": concurrency}
    train_r = await generate_records(engine, enc(train_p), seed=seed, **kw)
    held_r = await generate_records(engine, enc(held_p), seed=seed + 1_000_000, **kw)
    return train_r, held_r, time.perf_counter() - t0


def records_for(state: BootstrapState | None, capture, meta: dict):
    """(train, heldout, capture seconds): the state directory's records when it has them (nothing captured; a
    different capture `meta` is refused), else `capture()` and, with a state directory, saved there once."""
    if state is not None:
        got = state.load_records()
        if got is not None:
            train_r, held_r, saved = got
            saved.pop("generate_seconds", None)
            if saved != meta:
                raise ValueError(f"{state.dir}: its records were captured with {saved}, not {meta}; "
                                 "rerun with --fresh to discard them")
            return train_r, held_r, 0.0
    train_r, held_r, gen_s = capture()
    if state is not None:
        state.save_records(train_r, held_r, {**meta, "generate_seconds": gen_s})
    return train_r, held_r, gen_s


def teacher_split(settings, *, heldout_fraction: float = 0.2, max_prompts: int | None = None,
                  max_tokens: int = 128, temperature: float = 1.0, max_prompt_tokens: int = 256,
                  concurrency: int = 32, samples: int = 1, greedy: bool = False, text_tokens: int = 0,
                  window: int = 512, seed: int = 0, domains: tuple[str, ...] = DOMAINS, labels: str = "all"):
    """(train records, held-out records, seconds), teacher-forced (lkserve.trainer.teacher): the target's own
    completions of the train / held-out prompts from an engine WITHOUT speculation (`concurrency` streams, capture
    off: far more tokens per CPU-second than one spec engine capturing), then one target pass per window giving a
    label at every position (and an EAGLE-3 head's aux hidden states). `text_tokens` adds that many tokens of
    installed packages' text (teacher.package_texts) to the train side. `greedy`: each train prompt's T=0
    completion too, so the contexts of greedy serving (more repetitive than sampled text) are trained on as well.
    Labels are the target at T=1. `labels` "all": every position, prompt (chat template and user text) included;
    "completion": only the completions' positions, on both sides of the split, the text serving drafts (package
    text has no prompt: all of it)."""
    if labels not in LABELS:
        raise ValueError(f"bootstrap labels must be one of {LABELS}, not {labels!r}")
    from lkserve.engine.engine import Engine
    from lkserve.trainer import teacher

    train_p, held_p = bootstrap_prompts(heldout_fraction, max_prompts, seed, domains)
    nospec = settings.engine.model_copy(update={"method": "none", "draft_model": None,
                                                "max_num_seqs": max(settings.engine.max_num_seqs, concurrency)})
    off = settings.capture.model_copy(update={"enabled": False})
    kw = {"max_tokens": max_tokens, "temperature": temperature, "concurrency": concurrency}

    async def go():
        engine = await Engine.create(nospec, off, None, in_process=True)
        try:
            train_e = [encode(engine.tokenizer, t, max_prompt_tokens) for _, t in train_p]
            held_e = [encode(engine.tokenizer, t, max_prompt_tokens) for _, t in held_p]
            train_t = await teacher.self_generations(engine, train_e, samples=samples, **kw)
            train_s = [len(p) for p in train_e for _ in range(samples)]  # self_generations' order
            if greedy:
                train_t += await teacher.self_generations(engine, train_e, **{**kw, "temperature": 0.0})
                train_s += [len(p) for p in train_e]
            held_t = await teacher.self_generations(engine, held_e, **kw)
            return train_t, train_s, held_t, [len(p) for p in held_e], engine.tokenizer
        finally:
            await engine.shutdown()

    t0 = time.perf_counter()
    train_t, train_s, held_t, held_s, tok = asyncio.run(go())
    if text_tokens:
        texts = teacher.package_texts(tok, text_tokens, seed=seed)
        train_t, train_s = train_t + texts, train_s + [0] * len(texts)
    from lkserve.trainer.train import set_threads

    set_threads(settings.trainer.threads)  # run_bootstrap's offline_settings: the engine is stopped, the CPU is ours
    model = teacher.load_target(settings.engine.target_model)
    aux = teacher.aux_layers_of(settings.engine.draft_model) if settings.engine.method == "eagle3" else None
    rec = lambda seqs, starts, tags: teacher.teacher_records(
        model, seqs, top_k=settings.capture.top_k, num_positions=settings.engine.num_speculative_tokens,
        aux_layer_ids=aux, window=window, hidden_dtype=settings.capture.hidden_dtype, tags=tags, starts=starts)
    train_r, held_r = rec(train_t, train_s, {"split": "train"}), rec(held_t, held_s, {"split": "heldout"})
    if labels == "completion":
        train_r, held_r = teacher.completion_labels(train_r), teacher.completion_labels(held_r)
    return train_r, held_r, time.perf_counter() - t0


def offline_settings(settings):
    """`settings` with trainer.threads and trainer.precision set to the offline bootstrap's own (bootstrap_threads,
    bootstrap_precision resolved): its engine is stopped before the teacher pass and training, so they may take every
    CPU and bf16 matmuls where the CPU has them. EAGLE-3 head, quiet 2-core AVX512-BF16 CPU (bench/train_speed.py):
    1 thread fp32 317 positions/s (the online worker's knobs), 2 threads fp32 505, 2 threads bf16 965."""
    from lkserve.trainer.train import native_bf16

    t = settings.trainer
    threads = t.bootstrap_threads or len(os.sched_getaffinity(0))
    precision = t.bootstrap_precision if t.bootstrap_precision != "auto" else "bf16" if native_bf16() else "fp32"
    return settings.model_copy(update={"trainer": t.model_copy(update={"threads": threads, "precision": precision})})


def run_bootstrap(settings, registry, *, max_positions: int | None = None, max_minutes: float | None = None,
                  seed: int = 0, announce: bool = True, state_dir=None, fresh: bool = False, source: str = "teacher",
                  domains: tuple[str, ...] = DOMAINS, progress=_progress, **capture_kw) -> BootstrapResult:
    """The CLI. source "teacher": teacher_split (the target's own completions, teacher-forced); "served": an
    in-process engine serving settings.engine (capture on, memory sink) captures what verification sees
    (capture_split). Either engine is stopped before training (the CPU is the trainer's then); the draft is trained
    and registered, with offline_settings' threads and precision. `capture_kw`: the split's. `state_dir` (None: no
    state): resume from it (records, training state); `fresh` discards it first. `domains`: the prompt sets
    (prompt_texts), recorded as the metadata's "prompts" ("mtbench+humaneval" by default)."""
    from lkserve.engine.engine import Engine

    settings = offline_settings(settings)
    if source not in SOURCES:
        raise ValueError(f"bootstrap source must be one of {SOURCES}, not {source!r}")
    state = BootstrapState(state_dir) if state_dir is not None else None
    if state is not None and fresh:
        state.discard()
    capture = settings.capture.model_copy(update={
        "enabled": True, "sample_rate": 1.0, "hidden_states": settings.engine.method == "eagle3"})

    async def served():
        engine = await Engine.create(settings.engine, capture, None, in_process=True)
        try:
            return await capture_split(engine, seed=seed, domains=domains, **capture_kw)
        finally:
            await engine.shutdown()

    def collect():
        if source == "teacher":
            return teacher_split(settings.model_copy(update={"capture": capture}), seed=seed, domains=domains,
                                 **capture_kw)
        return asyncio.run(served())

    prompts = "+".join(d for d in DOMAINS if d in domains)
    meta = {"prompts": prompts, "seed": seed, "target": str(settings.engine.target_model),
            "draft": str(settings.engine.draft_model), "source": source, **capture_kw}
    train_r, held_r, gen_s = records_for(state, collect, meta)
    return bootstrap_records(settings, registry, train_r, held_r, max_positions=max_positions,
                             max_minutes=max_minutes, seed=seed, announce=announce, generate_seconds=gen_s,
                             extra_metadata={"prompts": prompts, "source": source, **capture_kw},
                             state_dir=state_dir, progress=progress)


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
