"""Tiny test models: deterministic, local, loadable."""

from __future__ import annotations

import torch

from lkserve.checkpoint import checkpoint_sha256
from lkserve.models.tiny import build_tiny_target, make_copy_draft, make_random_draft


def test_tiny_models_are_deterministic_and_distinct(tmp_path, tiny):
    again = build_tiny_target(tmp_path / "again", seed=0)
    assert checkpoint_sha256(again) == checkpoint_sha256(tiny.target)
    assert (again / "tokenizer.json").read_bytes() == (tiny.target / "tokenizer.json").read_bytes()
    assert checkpoint_sha256(tiny.copy_draft) == checkpoint_sha256(tiny.target)
    assert checkpoint_sha256(tiny.random_draft) != checkpoint_sha256(tiny.target)
    other = make_random_draft(tiny.target, tmp_path / "d2", seed=1)
    assert checkpoint_sha256(other) == checkpoint_sha256(tiny.random_draft)
    assert make_copy_draft(tiny.target, tmp_path / "c") == tmp_path / "c"


def test_tiny_target_loads_and_is_peaked(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    text = "def main(argv):\n    return 0\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 512
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(str(tiny.target), dtype=torch.float32)
    with torch.no_grad():
        p = model(torch.tensor([ids])).logits[0].softmax(-1)
    assert 0.05 < float(p.max(-1).values.mean()) < 0.9  # neither uniform nor deterministic
