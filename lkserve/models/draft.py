"""The default initial draft: the target truncated to its first N decoder layers.

The draft keeps the target's token embeddings, its first `num_layers` decoder layers, its final norm and its
(tied) LM head, copied bit for bit, and is saved in the same HF checkpoint layout as the target
(config.json with `num_hidden_layers=N`, model.safetensors, tokenizer files). transformers can train it
(`LlamaForCausalLM.from_pretrained(draft_dir)`) and vLLM loads it as a `draft_model`; hot-swapped weights
only need the same names and shapes.

N = 2 by default: see docs/models.md and bench/models.py for the measurement behind it. Which parameters
the worker trains (layers + norm, embeddings frozen, untying the head...) is the worker's choice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from lkserve.checkpoint import atomic_dir, dir_lock, sha256_file

DEFAULT_NUM_LAYERS = 2
MARKER_FILE = "lkserve-draft.json"
DERIVATION_VERSION = 1
# Files copied verbatim from the target (tokenizer and generation settings must match exactly).
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def draft_dir_for(cache_dir: str | os.PathLike, target_name: str, num_layers: int) -> Path:
    """Conventional location of a derived draft: `<cache>/models/<target>-draft-L<N>`."""
    return Path(cache_dir) / "models" / f"{target_name}-draft-L{num_layers}"


def draft_state_dict(target_state: dict, num_layers: int, tie_word_embeddings: bool = True) -> dict:
    """Select the draft's tensors from the target's state dict (same names, same tensors)."""
    out = {}
    for name, tensor in target_state.items():
        m = _LAYER_RE.match(name)
        if m is not None:
            if int(m.group(1)) < num_layers:
                out[name] = tensor
        elif name == "lm_head.weight" and tie_word_embeddings:
            continue  # tied: stored once, as the embedding
        else:
            out[name] = tensor  # embed_tokens, final norm, an untied lm_head
    return out


def derive_draft(
    target_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_layers: int = DEFAULT_NUM_LAYERS,
    *,
    force: bool = False,
) -> Path:
    """Write the draft derived from `target_dir` into `out_dir` (atomic, idempotent); return `out_dir`.

    Idempotent: a marker records the target's weight file (size, mtime, sha256) and N; a matching marker
    returns immediately. Layers are copied without any dtype change, so the draft's layer i is exactly the
    target's layer i.
    """
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    target_cfg = json.loads((target_dir / "config.json").read_text())
    total = int(target_cfg["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}] for {target_dir}, got {num_layers}")
    weights = target_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} missing: derive_draft needs a single-file HF checkpoint")
    stat = weights.stat()
    source = {
        "target_dir": str(target_dir.resolve()),
        "target_weights_size": stat.st_size,
        "target_weights_mtime_ns": stat.st_mtime_ns,
    }
    if not force and _marker_matches(out_dir, source, num_layers):
        return out_dir

    with dir_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not force and _marker_matches(out_dir, source, num_layers):
            return out_dir
        t0 = time.perf_counter()
        with atomic_dir(out_dir, replace=True) as tmp_dir:
            info = _write_draft(target_dir, tmp_dir, target_cfg, num_layers)
            marker = {
                "derivation_version": DERIVATION_VERSION,
                "num_layers": num_layers,
                "target_num_layers": total,
                **source,
                "target_weights_sha256": sha256_file(weights),
                "derived_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "derivation_seconds": round(time.perf_counter() - t0, 2),
                **info,
            }
            (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        return out_dir


def _marker_matches(out_dir: Path, source: dict, num_layers: int) -> bool:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not (out_dir / "config.json").is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    return (
        marker.get("derivation_version") == DERIVATION_VERSION
        and marker.get("num_layers") == num_layers
        and all(marker.get(k) == v for k, v in source.items())
    )


def _write_draft(target_dir: Path, out_dir: Path, target_cfg: dict, num_layers: int) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tied = bool(target_cfg.get("tie_word_embeddings", False))
    with safe_open(target_dir / "model.safetensors", framework="pt") as fh:
        names = list(fh.keys())
        metadata = fh.metadata() or {}
        wanted = draft_state_dict(dict.fromkeys(names), num_layers, tied)
        state = {name: fh.get_tensor(name) for name in wanted}
    if tied and "model.embed_tokens.weight" not in state:
        raise RuntimeError(f"{target_dir}: tied checkpoint without model.embed_tokens.weight")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": metadata.get("format", "pt")})

    cfg = dict(target_cfg)
    cfg["num_hidden_layers"] = num_layers
    for key in ("layer_types", "no_rope_layers", "sliding_window_layers"):  # per-layer lists, if any
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:num_layers]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in _COPIED_FILES:
        if (target_dir / name).is_file():
            shutil.copyfile(target_dir / name, out_dir / name)
    return {
        "num_parameters": sum(t.numel() for t in state.values()),
        "tie_word_embeddings": tied,
    }
