"""Write a draft version atomically, register it, announce it.

    <cache>/drafts/<version>/            config.json, model.safetensors, tokenizer files, lkserve-version.json
    <cache>/drafts/.<version>.tmp-XXXX   while being written (lkserve.checkpoint.atomic_dir); renamed into place only
                                         when complete and fsynced

A version is registered (with the sha256 of its model.safetensors) only after the rename, and `announce` re-hashes
the file before telling anyone, so a partial directory is never announced.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lkserve import checkpoint
from lkserve.checkpoint import WEIGHTS_FILE, atomic_dir, sha256_file
from lkserve.drafts import DraftRegistry

METADATA_FILE = "lkserve-version.json"
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "generation_config.json")


def write_checkpoint(model, source_dir: str | Path, cache_dir: str | Path, version: str, metadata: dict | None = None,
                     save=None, _fail_after_weights: bool = False) -> tuple[Path, str]:
    """Save `model` as `<cache>/drafts/<version>` with `save(model, dir, source_dir)` (default: a draft model in
    HF layout, lkserve.trainer.drafts.DraftModelOps.save), copying tokenizer/generation files from `source_dir`
    (the base draft). Returns (path, sha256 of model.safetensors). Atomic: temp dir + rename."""
    if save is None:
        from lkserve.trainer.drafts import DraftModelOps  # drafts imports nothing of publish: no cycle

        save = DraftModelOps.save
    final = Path(cache_dir) / "drafts" / version
    with atomic_dir(final) as tmp:
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
    return final, sha


def clean_partial(cache_dir: str | Path) -> int:
    """Remove leftover temp dirs of a crashed writer (call at worker start): atomic_dir's `.<version>.tmp-*` and
    the `.tmp-<version>-<pid>` of caches written before it. Returns how many were removed."""
    drafts = Path(cache_dir) / "drafts"
    if not drafts.is_dir():
        return 0
    n = checkpoint.clean_partial(drafts)
    for d in drafts.glob(".tmp-*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def free_version(registry: DraftRegistry, cache_dir: str | Path) -> str:
    """The registry's next version whose `<cache>/drafts/<version>` does not exist yet: a registry that forgot its
    count (the embedded Redis keeps nothing across restarts by default) must not collide with an earlier run's
    drafts, which stay on disk."""
    while True:
        version = registry.next_version()
        if not (Path(cache_dir) / "drafts" / version).exists():
            return version


def publish(registry: DraftRegistry, model, source_dir: str | Path, cache_dir: str | Path,
            metadata: dict | None = None, version: str | None = None, announce: bool = True, save=None) -> dict:
    """write_checkpoint + register + announce. Returns the registry metadata of the new version."""
    version = version or free_version(registry, cache_dir)
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
        registry.client.set(registry.keys.current, version)
    return meta
