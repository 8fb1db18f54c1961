"""The checkpoint leaf: hashing, headers, dtype, atomic directory writes and file-level validation, on real files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lkserve import checkpoint as ck


def _write(d, tensors, config=None):
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / ck.WEIGHTS_FILE))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_meta_dtype_and_sha(tmp_path):
    d = _write(tmp_path / "a", {"w": torch.zeros(3, 4, dtype=torch.bfloat16), "i": torch.zeros(2, dtype=torch.int64)})
    assert ck.safetensors_meta(d) == {"w": ((3, 4), "BF16"), "i": ((2,), "I64")}
    assert ck.checkpoint_float_dtype(d) == torch.bfloat16
    assert ck.checkpoint_sha256(d) == ck.sha256_file(d / ck.WEIGHTS_FILE)
    save_file({"x": torch.ones(1)}, str(d / "extra.safetensors"))
    assert ck.checkpoint_sha256(d) != ck.sha256_file(d / ck.WEIGHTS_FILE)  # sharded: hash of the name/sha lines


def test_validate_files_refuses_each_kind_of_wrong_file(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 8}
    live = _write(tmp_path / "live", {"w": torch.zeros(3, 4)}, cfg)
    ref_meta, sha = ck.safetensors_meta(live), ck.checkpoint_sha256(live)
    assert ck.validate_files(live, sha, ref_meta, cfg) == sha
    bf16 = _write(tmp_path / "bf16", {"w": torch.zeros(3, 4, dtype=torch.bfloat16)}, cfg)
    ck.validate_files(bf16, None, ref_meta, cfg)  # another float dtype is fine: cast on load
    cases = {
        "sha256 mismatch": (live, "0" * 64),
        "config mismatch on hidden_size": (_write(tmp_path / "c", {"w": torch.zeros(3, 4)}, {"hidden_size": 9}), None),
        "shape mismatch": (_write(tmp_path / "s", {"w": torch.zeros(4, 3)}, cfg), None),
        "tensor names differ": (_write(tmp_path / "n", {"v": torch.zeros(3, 4)}, cfg), None),
        "dtype mismatch": (_write(tmp_path / "d", {"w": torch.zeros(3, 4, dtype=torch.int32)}, cfg), None),
        "not a directory": (tmp_path / "missing", None),
    }
    for why, (path, want_sha) in cases.items():
        with pytest.raises(ck.CheckpointError, match=why):
            ck.validate_files(path, want_sha, ref_meta, cfg)


def test_load_finite_casts_and_refuses_nan_and_overflow(tmp_path):
    ok = _write(tmp_path / "ok", {"w": torch.ones(2)})
    assert ck.load_finite(ok, torch.bfloat16)["w"].dtype == torch.bfloat16
    with pytest.raises(ck.CheckpointError, match="non-finite"):
        ck.load_finite(_write(tmp_path / "nan", {"w": torch.tensor([float("nan")])}))
    with pytest.raises(ck.CheckpointError, match="overflows"):
        ck.load_finite(_write(tmp_path / "big", {"w": torch.tensor([1e6])}), torch.float16)


def test_atomic_dir_publishes_whole_or_nothing(tmp_path):
    final = tmp_path / "v0001"
    with pytest.raises(RuntimeError), ck.atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash mid-write")
    assert not final.exists() and not list(tmp_path.iterdir())
    with ck.atomic_dir(final) as tmp:
        (tmp / "a").write_text("whole")
    assert (final / "a").read_text() == "whole"
    with pytest.raises(FileExistsError), ck.atomic_dir(final):
        pass
    with ck.atomic_dir(final, replace=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["v0001"]
    (tmp_path / ".v0002.tmp-abc").mkdir()
    assert ck.clean_partial(tmp_path) == 1
