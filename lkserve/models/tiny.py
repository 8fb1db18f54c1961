"""Tiny random Llama checkpoints for tests: built locally in seconds, nothing downloaded.

A target is a random-init `LlamaForCausalLM` (fp32) with a byte-level BPE tokenizer trained on text from Python's own
standard library, saved in HF layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a
small chat template) so vLLM loads it like any other model. Drafts share the tokenizer and vocabulary:
`make_random_draft` (same architecture, another seed: acceptance near 0 at T=0) and `make_copy_draft`
(the target's own weights: acceptance near 1).

Random init with the default `initializer_range` (0.02) gives almost uniform next-token distributions; the target
uses a larger one so distributions are peaked (top-1 probability around 0.1-0.6) and sampling tests have power.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TINY_VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Files of the stdlib whose text trains the tokenizer (present in every CPython install).
_CORPUS_FILES = ["textwrap.py", "argparse.py", "json/__init__.py", "string.py", "difflib.py", "pathlib.py"]


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = TINY_VOCAB
    hidden_size: int = 128  # 4 heads of 32: vLLM's CPU attention needs head_size in {32, 64, ...}
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    initializer_range: float = 0.2


def _corpus_text(max_chars: int = 400_000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in _CORPUS_FILES:
        p = stdlib / rel
        if p.exists():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    if not text:  # a stripped Python: fall back to something that is always there
        text = (__doc__ or "") * 50
    return text[:max_chars]


def train_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained on stdlib text; deterministic (the trainer is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _corpus_text()
    lines = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=1)
    )


def _llama_config(spec: TinySpec, tok):
    from transformers import LlamaConfig

    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=bos,
        dtype="float32",
    )


def _random_model(config, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Norm weights stay 1 under HF init; perturb them too so two seeds differ everywhere.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _save_model(model, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    # transformers may write generation_config.json with sampling defaults; vLLM reads it. Keep it neutral.
    gen = out / "generation_config.json"
    cfg = model.config
    gen.write_text(json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=1))


def _atomic_build(out: Path, build) -> Path:
    """Build into a temp dir then rename: concurrent builders (xdist, two sessions) never see half a checkpoint."""
    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # someone else won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_target(out_dir: str | os.PathLike, seed: int = 0, spec: TinySpec = TinySpec()) -> Path:
    """A random tiny Llama target + tokenizer in HF layout at out_dir (reused if already there)."""

    def build(tmp: Path) -> None:
        tok = train_tokenizer(spec.vocab_size)
        model = _random_model(_llama_config(spec, tok), seed)
        _save_model(model, tmp)
        _save_tokenizer(tok, tmp)

    return _atomic_build(Path(out_dir), build)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def make_random_draft(target_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 1) -> Path:
    """Same architecture, tokenizer and vocabulary as the target, other random weights."""
    target_dir = Path(target_dir)

    def build(tmp: Path) -> None:
        from transformers import LlamaConfig

        config = LlamaConfig.from_pretrained(str(target_dir))
        model = _random_model(config, seed)
        _save_model(model, tmp)
        _copy_tokenizer(target_dir, tmp)

    return _atomic_build(Path(out_dir), build)


def make_copy_draft(target_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """draft = target: a plain copy of the checkpoint directory."""
    target_dir = Path(target_dir)

    def build(tmp: Path) -> None:
        for f in target_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)

    return _atomic_build(Path(out_dir), build)


@dataclass(frozen=True)
class TinyModels:
    target: Path
    random_draft: Path
    copy_draft: Path


def tiny_models(root: str | os.PathLike, seed: int = 0) -> TinyModels:
    """Target, random draft and draft = target under root (built once, then reused)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = build_tiny_target(root / f"target-s{seed}", seed=seed)
    return TinyModels(
        target=target,
        random_draft=make_random_draft(target, root / f"draft-random-s{seed + 1}", seed=seed + 1),
        copy_draft=make_copy_draft(target, root / f"draft-copy-s{seed}"),
    )
