"""Draft checkpoints on disk: hashing, safetensors headers, dtype, atomic directory writes, file-level validation.

A leaf: it imports nothing of lkserve, so models, trainer, engine and gateway can all use it without cycles.
torch is imported only by the functions that load tensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAFETENSORS_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

# Keys of a draft's config.json that must not change between versions served by one engine.
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
# EAGLE-3 heads (speculators layout): top-level keys; the decoder layer's own keys are under
# transformer_layer_config and checked with ARCH_KEYS.
EAGLE3_KEYS = ("speculators_model_type", "draft_vocab_size", "target_hidden_size", "norm_before_residual",
               "eagle_aux_hidden_state_layer_ids", "norm_before_fc", "fc_norm", "norm_output")


class CheckpointError(Exception):
    """A checkpoint that must not be served: incomplete, not the one announced, or of another layout."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's weights: of its one *.safetensors file, else of the sorted 'name sha256' lines of
    all of them (so a sharded checkpoint still has one identity)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def safetensors_meta(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers of a directory, without loading tensors."""
    meta = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, v in header.items():
            if name != "__metadata__":
                meta[name] = (tuple(v["shape"]), v["dtype"])
    return meta


def checkpoint_float_dtype(model_dir: str | os.PathLike):
    """The float dtype most of a checkpoint's weights are stored in (what an engine serves it in), or None."""
    import torch

    counts: dict[str, int] = {}
    for shape, dtype in safetensors_meta(model_dir).values():
        if dtype in SAFETENSORS_TO_TORCH:
            n = 1
            for d in shape:
                n *= d
            counts[dtype] = counts.get(dtype, 0) + n
    if not counts:
        return None
    return getattr(torch, SAFETENSORS_TO_TORCH[max(counts, key=counts.get)])


def config_mismatch(cfg: dict, ref: dict) -> str | None:
    """First architecture difference between a candidate draft config and the live one (None: compatible)."""
    for key in ARCH_KEYS + EAGLE3_KEYS:
        if key in cfg and key in ref and cfg[key] != ref[key]:
            return f"config mismatch on {key}: {cfg[key]} != live {ref[key]}"
    sub, rsub = cfg.get("transformer_layer_config"), ref.get("transformer_layer_config")
    if isinstance(sub, dict) and isinstance(rsub, dict):
        for key in ARCH_KEYS:
            if key in sub and key in rsub and sub[key] != rsub[key]:
                return f"config mismatch on transformer_layer_config.{key}: {sub[key]} != live {rsub[key]}"
    return None


def validate_files(path: Path, sha256: str | dict | None, ref_meta: dict, ref_config: dict) -> str:
    """Check a candidate draft directory against the live draft's tensor layout and config, without loading a
    tensor; return its checkpoint sha256. `sha256` is the announced digest (one string, or file name -> digest).
    The checksum comes first: never parse a file that is not the one announced."""
    if not path.is_dir():
        raise CheckpointError(f"not a directory: {path}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {path}")
    actual = checkpoint_sha256(path)
    if isinstance(sha256, dict):
        for f in files:
            want = sha256.get(f.name)
            if want is not None and sha256_file(f) != want.lower():
                raise CheckpointError(f"sha256 mismatch for {f.name}")
    elif sha256 is not None and actual != str(sha256).lower():
        raise CheckpointError(f"sha256 mismatch: expected {sha256}, got {actual}")
    cfg_file = path / "config.json"
    if cfg_file.exists() and ref_config:
        bad = config_mismatch(json.loads(cfg_file.read_text()), ref_config)
        if bad:
            raise CheckpointError(bad)
    if ref_meta:
        meta = safetensors_meta(path)
        missing, extra = sorted(set(ref_meta) - set(meta)), sorted(set(meta) - set(ref_meta))
        if missing or extra:
            raise CheckpointError(f"tensor names differ: missing {missing[:5]} unexpected {extra[:5]}")
        for name, (shape, dtype) in meta.items():
            rshape, rdtype = ref_meta[name]
            if shape != rshape:
                raise CheckpointError(f"shape mismatch for {name}: {list(shape)} != live {list(rshape)}")
            # a trainer keeps fp32 master weights: any float dtype is fine (cast on load, as vLLM's own loader
            # casts at start-up), but a float tensor where the live one is not (or vice versa) is a wrong file
            if dtype != rdtype and (dtype in FLOAT_DTYPES) != (rdtype in FLOAT_DTYPES):
                raise CheckpointError(f"dtype mismatch for {name}: {dtype} != live {rdtype}")
    return actual


def load_finite(path: Path, dtype=None) -> dict:
    """All tensors of a checkpoint directory, float ones cast to `dtype`; refuses NaN/inf before and after."""
    import torch
    from safetensors.torch import load_file

    sd: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f), device="cpu"))
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"non-finite values in {name}")
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name} overflows the serving dtype {dtype}")
            sd[name] = t
    return sd


def fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False, durable: bool = True) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary sibling of `final` (same filesystem); when the block ends
    without error it is fsynced (when `durable`) and renamed to `final`, else removed. Readers see either no
    `final`, the old one, or the complete new one, never a partial directory. `replace=False` refuses an
    existing `final` (version directories are immutable)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a published directory gets normal permissions
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if durable:
            fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_partial(root: str | os.PathLike) -> int:
    """Remove the temporary directories `atomic_dir` leaves behind when a process dies mid-write."""
    n = 0
    for p in Path(root).glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


@contextlib.contextmanager
def dir_lock(lock_path: Path):
    """An exclusive advisory lock held while a checkpoint directory is (re)built by one of several processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
