"""The draft swapper without an engine: what it refuses and accepts on real files, rollback, the shared-tensor guard.
(The leaf checks are in test_checkpoint.py; test_engine_swap.py does the same through a running engine.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lkserve.checkpoint import CheckpointError, checkpoint_sha256
from lkserve.engine.swap import DraftSwapper, SwapError, check_not_shared, shared_with_target

CONFIG = {"model_type": "llama", "hidden_size": 8, "vocab_size": 32, "num_hidden_layers": 1}


def _write(path, sd, config=CONFIG):
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(32, 8, generator=g),
            "model.norm.weight": torch.ones(8), "lm_head.weight": torch.randn(32, 8, generator=g)}


@pytest.fixture
def base(tmp_path):
    return _write(tmp_path / "base", _weights(0))


def _edited(tmp_path, name, edit=None, config=CONFIG):
    sd = _weights(1)
    if edit:
        edit(sd)
    return _write(tmp_path / name, sd, config)


def test_validate_accepts_a_right_checkpoint_and_casts_it(base, tmp_path):
    swapper = DraftSwapper(base, "base", serving_dtype=torch.float32)
    assert swapper.sha256 == checkpoint_sha256(base) and swapper.info()["num_tensors"] == 3
    good = _edited(tmp_path, "bf16", lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    sd, sha = swapper.validate(good, checkpoint_sha256(good))
    assert sha == checkpoint_sha256(good)
    assert set(sd) == set(_weights()) and all(t.dtype == torch.float32 for t in sd.values())


def _nan(sd):
    sd["model.norm.weight"] = torch.full((8,), float("nan"))


@pytest.mark.parametrize("case,reason", [
    ("absent", "not a directory"),
    ("empty", "no *.safetensors"),
    ("sha", "sha256 mismatch"),
    ("config", "config mismatch on hidden_size"),
    ("shape", "shape mismatch"),
    ("missing", "tensor names differ"),
    ("dtype", "dtype mismatch"),
    ("nan", "non-finite"),
    ("overflow", "overflows the serving dtype"),
])
def test_validate_refuses_wrong_files(base, tmp_path, case, reason):
    swapper = DraftSwapper(base, "base", serving_dtype=torch.float16)
    sha = None
    if case == "absent":
        path = tmp_path / "nope"
    elif case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "sha":
        path, sha = _edited(tmp_path, "sha"), "0" * 64
    elif case == "config":
        path = _edited(tmp_path, "config", config={**CONFIG, "hidden_size": 16})
    else:
        edit = {"shape": lambda sd: sd.update({"lm_head.weight": torch.zeros(32, 4)}),
                "missing": lambda sd: sd.pop("lm_head.weight"),
                "dtype": lambda sd: sd.update({"model.norm.weight": torch.ones(8, dtype=torch.int32)}),
                "nan": _nan,
                "overflow": lambda sd: sd.update({"model.norm.weight": torch.full((8,), 1e30)})}[case]
        path = _edited(tmp_path, case, edit)
    with pytest.raises(CheckpointError, match=reason.replace("*", r"\*")):
        swapper.validate(path, sha)
    res = swapper.swap(str(path), "bad", sha, apply=lambda sd: None)
    assert not res["ok"] and reason in res["reason"] and swapper.version == "base"


def test_swap_applies_and_rolls_back_a_failed_reload(base, tmp_path):
    swapper = DraftSwapper(base, "base")
    applied = []
    good = _edited(tmp_path, "v1")
    res = swapper.swap(str(good), "v1", None, apply=applied.append)
    assert res["ok"] and swapper.version == "v1" and swapper.sha256 == checkpoint_sha256(good)
    torch.testing.assert_close(applied[-1]["lm_head.weight"], load_file(str(good / "model.safetensors"))["lm_head.weight"])

    def flaky(sd):
        applied.append(sd)
        if len(applied) == 2:
            raise RuntimeError("layer repack failed")

    other = tmp_path / "v2"
    shutil.copytree(good, other)
    res = swapper.swap(str(other), "v2", None, apply=flaky)
    assert not res["ok"] and "reload failed" in res["reason"] and "rolled back" in res["reason"]
    assert applied[-1] is applied[0]  # the version that was serving went back in
    assert swapper.version == "v1" and [h["ok"] for h in swapper.history] == [True, False]

    res = swapper.swap(str(good), "v3", None, apply=None)
    assert not res["ok"] and "no draft model" in res["reason"]


def test_tensors_shared_with_the_target_are_refused(base, tmp_path):
    target = torch.nn.Module()
    target.embed_tokens = torch.nn.Embedding(32, 8)
    target.lm_head = torch.nn.Linear(8, 32, bias=False)
    draft = torch.nn.Module()
    draft.model = torch.nn.Module()
    draft.model.embed_tokens = target.embed_tokens  # as vLLM does for an EAGLE-3 head without its own embedding
    draft.model.norm = torch.nn.LayerNorm(8)
    shared = shared_with_target(draft, target)
    assert "model.embed_tokens.weight" in shared and "embed_tokens.weight" in shared
    assert not any("norm" in s for s in shared) and shared_with_target(draft, None) == set()
    check_not_shared({"model.norm.weight": torch.ones(8)}, shared)
    with pytest.raises(SwapError, match="shares with the target"):
        check_not_shared({"model.embed_tokens.weight": torch.zeros(32, 8)}, shared)

    before = target.embed_tokens.weight.detach().clone()

    def apply(sd):
        check_not_shared(sd, shared)
        with torch.no_grad():
            draft.model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])

    swapper = DraftSwapper(base, "base")
    res = swapper.swap(str(_edited(tmp_path, "clash")), "clash", None, apply=apply)
    assert not res["ok"] and "shares with the target" in res["reason"]
    assert torch.equal(target.embed_tokens.weight, before)  # the target's weights were never written
