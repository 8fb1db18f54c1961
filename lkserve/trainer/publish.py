"""Write a draft version atomically, register it, announce it.

    <cache>/drafts/<version>/           config.json, model.safetensors, tokenizer files, lkserve-version.json
    <cache>/drafts/.tmp-<version>-<pid> while being written; renamed into place only when complete and fsynced

A version is registered (with the sha256 of its model.safetensors) only after the rename, and `announce` re-hashes
the file before telling anyone, so a partial directory is never announced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from lkserve.trainer.registry import WEIGHTS_FILE, DraftRegistry, sha256_file

METADATA_FILE = "lkserve-version.json"
_SAFETENSORS_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "generation_config.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def checkpoint_float_dtype(model_dir: str | Path):
    """The float dtype the checkpoint in `model_dir` is stored in (what the engine serves it in), or None."""
    import torch

    from lkserve.checkpoint import safetensors_meta

    counts: dict[str, int] = {}
    for shape, dtype in safetensors_meta(model_dir).values():
        if dtype in _SAFETENSORS_TO_TORCH:
            n = 1
            for d in shape:
                n *= d
            counts[dtype] = counts.get(dtype, 0) + n
    if not counts:
        return None
    return getattr(torch, _SAFETENSORS_TO_TORCH[max(counts, key=counts.get)])


def write_checkpoint(model, source_dir: str | Path, cache_dir: str | Path, version: str, metadata: dict | None = None,
                     save=None, _fail_after_weights: bool = False) -> tuple[Path, str]:
    """Save `model` as `<cache>/drafts/<version>` with `save(model, dir, source_dir)` (default: a draft model in
    HF layout), copying tokenizer/generation files from `source_dir` (the base draft). Returns (path, sha256 of
    model.safetensors). Atomic: temp dir + rename.

    Weights are stored in the base draft's dtype (bf16 for the default model), not the trainer's fp32 master
    copy: half the bytes to write and ship, and the file is exactly what the engine will serve."""
    if save is None:
        from lkserve.trainer.drafts import DraftModelOps

        save = DraftModelOps.save
    drafts = Path(cache_dir) / "drafts"
    drafts.mkdir(parents=True, exist_ok=True)
    final = drafts / version
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = drafts / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save(model, tmp, source_dir)
        for name in _COPY:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if _fail_after_weights:  # test hook: a crash in the middle of writing
            raise RuntimeError("simulated crash while writing a checkpoint")
        sha = sha256_file(tmp / WEIGHTS_FILE)
        meta = {"version": version, "sha256": sha, "written_at": time.time(), **(metadata or {})}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(drafts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, sha


def clean_partial(cache_dir: str | Path) -> int:
    """Remove leftover temp dirs of a crashed writer (call at worker start). Returns how many were removed."""
    drafts = Path(cache_dir) / "drafts"
    n = 0
    if drafts.is_dir():
        for d in drafts.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def publish(registry: DraftRegistry, model, source_dir: str | Path, cache_dir: str | Path,
            metadata: dict | None = None, version: str | None = None, announce: bool = True, save=None) -> dict:
    """write_checkpoint + register + announce. Returns the registry metadata of the new version."""
    version = version or registry.next_version()
    path, sha = write_checkpoint(model, source_dir, cache_dir, version, metadata, save=save)
    meta = registry.register(version, path, sha, metadata)
    if announce:
        registry.announce(version, reason="publish")
    return registry.get(version) or meta


def register_base(registry: DraftRegistry, base_dir: str | Path, version: str = "base") -> dict:
    """Register the initial draft the engine starts with (so rollback can return to it) and make it current if
    nothing is. Does not announce (the engines already serve it)."""
    base_dir = Path(base_dir)
    meta = registry.get(version)
    if meta is None:
        meta = registry.register(version, base_dir, sha256_file(base_dir / WEIGHTS_FILE), {"base": True})
    if registry.current() is None:
        registry.client.set(registry.k["current"], version)
    return meta
