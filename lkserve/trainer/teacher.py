"""Teacher-forced bootstrap records: the target's distribution at EVERY position of a token sequence, at prefill speed.

Decoding gives the trainer about one verified position per target step; one target forward over a sequence of L
tokens gives L - 1 labelled positions (and, for an EAGLE-3 head, the aux hidden states at every position) for about
the cost of one step on a CPU. The records are the same VerificationRecords capture writes, so the worker's ops
train on them unchanged:

    context_token_ids  the sequence (a window of it)
    positions          1 .. L-1: the target's distribution at row p - 1 predicts token p
    draft_index        p mod K (every position is a label for every draft step; this only spreads the gamma weights)
    draft_token_ids    the sequence's own token (accepted = True): there was no draft
    hidden_states      aux layers as vLLM's EAGLE-3 path takes them: layer i's INPUT (the residual stream before
                       layer i; i == num_layers: the last layer's output before the final norm), hidden_start 0

Which sequences: the target's own generations (what serving will see at T=1: see bootstrap.self_texts) or text
from installed packages (package_texts; never the standard library or Debian's metadata, which are reserved).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import random
import sysconfig
import uuid
from pathlib import Path

import numpy as np
import torch

from lkserve.capture.record import VerificationRecord, hidden_to_words

TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")


def load_target(target_dir, dtype: torch.dtype = torch.float32):
    """The target as a transformers causal LM (the same checkpoint directory vLLM serves), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).eval()


@torch.inference_mode()
def forward_window(model, ids: torch.Tensor, aux_layer_ids=None):
    """One target pass over ids [L]: (logits [L, V] fp32, aux [L, n_aux * H] fp32 or None)."""
    inner = model.model
    grabbed: dict[int, torch.Tensor] = {}
    hooks = []
    if aux_layer_ids:
        n = len(inner.layers)
        for i in aux_layer_ids:
            if i == 0:
                hooks.append(inner.embed_tokens.register_forward_hook(
                    lambda m, a, out, i=i: grabbed.__setitem__(i, out[0])))
            else:  # input of layer i == output of layer i - 1 (for i == n: the last layer's, before the norm)
                if not 0 < i <= n:
                    raise ValueError(f"aux layer {i} outside 0..{n}")
                hooks.append(inner.layers[i - 1].register_forward_hook(
                    lambda m, a, out, i=i: grabbed.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0])))
    try:
        logits = model(input_ids=ids[None]).logits[0].float()  # [L, V]
    finally:
        for h in hooks:
            h.remove()
    aux = torch.cat([grabbed[i].float() for i in aux_layer_ids], -1) if aux_layer_ids else None
    return logits, aux


def aux_layers_of(head_dir) -> list[int]:
    """The target layers an EAGLE-3 head reads (its config's eagle_aux_hidden_state_layer_ids)."""
    import json

    from lkserve.models.eagle3 import spec_from_config

    return list(spec_from_config(json.loads((Path(head_dir) / "config.json").read_text())).aux_layer_ids)


def window_record(ids: torch.Tensor, logits: torch.Tensor, aux, *, top_k: int, temperature: float,
                  num_positions: int, model_id: str = "", hidden_dtype: str = "bf16", tags=None) -> VerificationRecord:
    """The record of one window: ids [L], logits [L, V] (row t predicts token t + 1), aux [L, D] or None."""
    L = int(ids.shape[0])
    probs = torch.softmax(logits[: L - 1] / max(temperature, 1e-5), -1)  # [L-1, V]; T ~ 0 = near one-hot
    tp, ti = probs.topk(top_k, -1)  # [L-1, k]
    pos = np.arange(1, L, dtype=np.uint32)
    ctx = ids.numpy().astype(np.uint32)
    return VerificationRecord(
        request_id=f"teacher-{uuid.uuid4().hex[:12]}", model_id=model_id, draft_version="teacher",
        temperature=float(temperature), context_token_ids=ctx, positions=pos,
        draft_index=(pos % num_positions).astype(np.uint8), draft_token_ids=ctx[1:].copy(),
        accepted=np.ones(L - 1, dtype=bool), topk_ids=ti.numpy().astype(np.uint32),
        topk_probs=tp.numpy().astype(np.float16), residual=(1.0 - tp.sum(-1)).clamp(0, 1).numpy().astype(np.float16),
        draft_probs=np.full(L - 1, np.nan, dtype=np.float16), tags={"source": "teacher", **(tags or {})},
        hidden_states=None if aux is None else hidden_to_words(aux, hidden_dtype), hidden_start=0,
        hidden_dtype=hidden_dtype)


PER_POSITION = ("positions", "draft_index", "draft_token_ids", "accepted", "topk_ids", "topk_probs", "residual",
                "draft_probs")


def labels_from(record: VerificationRecord, start: int) -> VerificationRecord:
    """`record` with only its labels at context positions >= `start` (a completion's, not its prompt's). The
    context and hidden states stay whole: the draft still reads the prompt, it is only not trained to predict it."""
    keep = np.asarray(record.positions) >= start  # [P]
    return dataclasses.replace(record, **{f: getattr(record, f)[keep] for f in PER_POSITION})


def teacher_records(model, sequences, *, top_k: int = 32, temperature: float = 1.0, num_positions: int = 4,
                    aux_layer_ids=None, window: int = 512, min_tokens: int = 8, model_id: str = "",
                    hidden_dtype: str = "bf16", tags=None, progress=None, starts=None) -> list[VerificationRecord]:
    """Records of every window of `window` tokens of every sequence (lists of token ids); windows shorter than
    `min_tokens` are skipped. `starts` (one per sequence: its prompt's length) tags each window with
    "completion_start", the first completion position in the window's own coordinates, for completion_labels.
    `progress(positions_so_far)` after each window."""
    out, done = [], 0
    for n, seq in enumerate(sequences):
        for a in range(0, len(seq), window):
            ids = torch.as_tensor(seq[a: a + window], dtype=torch.long)
            if ids.shape[0] < min_tokens:
                continue
            logits, aux = forward_window(model, ids, aux_layer_ids)
            own = {} if starts is None else {"completion_start": str(max(0, int(starts[n]) - a))}
            out.append(window_record(ids, logits, aux, top_k=top_k, temperature=temperature,
                                     num_positions=num_positions, model_id=model_id, hidden_dtype=hidden_dtype,
                                     tags={**(tags or {}), **own}))
            done += out[-1].num_positions
            if progress is not None:
                progress(done)
    return out


def completion_labels(records: list) -> list | None:
    """The records' completion labels only (labels_from at each record's "completion_start" tag), records left
    without labels dropped: the positions serving drafts (the prompt is prefilled, never drafted). None when a
    record has no such tag (records captured before it existed, or served ones)."""
    if not all("completion_start" in r.tags for r in records):
        return None
    out = [labels_from(r, int(r.tags["completion_start"])) for r in records]
    return [r for r in out if r.num_positions]


DEBIAN_METADATA = (Path("/usr/share/doc"), Path("/var/lib/dpkg"), Path("/usr/share/common-licenses"))


def is_reserved(path) -> bool:
    """True for a file of the standard library (reserved for evaluation) or of Debian's package metadata. A
    site-packages/dist-packages directory inside the stdlib tree holds installed packages, not the stdlib."""
    p = Path(path).resolve()
    if any(p.is_relative_to(r) for r in DEBIAN_METADATA):
        return True
    if "site-packages" in p.parts or "dist-packages" in p.parts:
        return False
    paths = sysconfig.get_paths()
    stdlib = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib") if k in paths}
    return any(p.is_relative_to(r) for r in stdlib) or p.is_relative_to("/usr/lib/python3")


def package_files(suffixes=TEXT_SUFFIXES, max_files: int | None = None, seed: int = 0,
                  exclude: tuple[str, ...] = ("lkserve",)) -> list[Path]:
    """Text and code files of the installed distributions (importlib.metadata: pip-installed packages only, so the
    standard library is never among them; is_reserved double-checks), interleaved across distributions (round
    robin, each distribution's files shuffled with `seed`) so a budget covers many packages, not one."""
    per_dist: dict[str, list[Path]] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name or name in exclude or name in per_dist:
            continue
        files = []
        for f in dist.files or ():
            if f.suffix in suffixes:
                p = Path(f.locate())
                if p.is_file() and not is_reserved(p):
                    files.append(p)
        if files:
            random.Random(f"{seed}:{name}").shuffle(files)
            per_dist[name] = files
    out, names = [], sorted(per_dist)
    for i in range(max(map(len, per_dist.values()), default=0)):
        out.extend(per_dist[n][i] for n in names if i < len(per_dist[n]))
        if max_files is not None and len(out) >= max_files:
            return out[:max_files]
    return out


def package_texts(tokenizer, max_tokens: int, *, seed: int = 0, max_chars_per_file: int = 20_000) -> list[list[int]]:
    """Token sequences from package_files until `max_tokens` tokens (each file's first `max_chars_per_file`
    characters)."""
    out, total = [], 0
    for p in package_files(seed=seed):
        try:
            text = p.read_text(encoding="utf-8")[:max_chars_per_file]
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        ids = list(tokenizer(text)["input_ids"])
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return out


async def self_generations(engine, prompts: list[list[int]], *, samples: int = 1, max_tokens: int = 256,
                           temperature: float = 1.0, concurrency: int = 32) -> list[list[int]]:
    """prompt + completion token ids of `samples` completions per prompt, `concurrency` requests in flight: the
    target's own text, the contexts serving will see. Meant for an engine without speculation (capture off): at
    many streams a CPU decodes several times faster than one spec-decoding engine captures."""
    import asyncio

    from lkserve.engine.engine import sampling_params

    slots = asyncio.Semaphore(concurrency)  # a new request as soon as one finishes (no batch tail)

    async def one(ids: list[int]) -> list[int]:
        sp = sampling_params(temperature=temperature, max_tokens=max_tokens)
        out = list(ids)
        async with slots:
            async for ch in engine.generate(ids, sp, f"self-{uuid.uuid4().hex[:12]}", capture=False):
                out += ch.token_ids
        return out

    return list(await asyncio.gather(*(one(p) for p in prompts for _ in range(samples))))
