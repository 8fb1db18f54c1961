"""lkserve.engine.vllm's pieces that need no running engine: the CPU fixes, the version check; the record wire format
and checkpoint helpers they hand data through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lkserve import checkpoint
from lkserve.capture.record import record_from_wire, record_to_wire
from lkserve.capture.sink import make_capture_sink
from lkserve.engine.vllm import patches as va


def test_torch_expand_matches_the_reference_semantics():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = int(torch.randint(1, 6, (1,), generator=gen))
        counts = torch.randint(0, 5, (b,), generator=gen)
        cu = counts.cumsum(0).to(torch.int32)
        x = torch.rand(b, generator=gen)
        x[0] = 0.0
        out = va.torch_expand_batch_to_tokens(x, cu, int(cu[-1]), replace_from=0, replace_to=1)
        want = torch.cat([torch.full((int(c),), 1.0 if v == 0 else float(v)) for v, c in zip(x, counts)])
        assert torch.equal(out, want)
        k = torch.randint(0, 50, (b,), generator=gen, dtype=torch.int32)
        assert torch.equal(va.torch_expand_batch_to_tokens(k, cu, int(cu[-1])), k.repeat_interleave(counts))


def test_cpu_bug_is_detected_on_this_vllm():
    buggy = va.cpu_expand_is_buggy()
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and va.vllm_version().startswith("0.32."):
        assert buggy is True  # the behaviour the fix exists for (notes/vllm-cpu.md)
    state = va.apply_cpu_fixes()
    assert va.apply_cpu_fixes() == state  # idempotent
    from vllm.v1.sample import rejection_sampler as rs

    if state["applied"]:
        assert getattr(rs.expand_batch_to_tokens, "_lkserve_fix", False)
        temps = rs.expand_batch_to_tokens(torch.tensor([0.5, 0.0]), torch.tensor([2, 3], dtype=torch.int32), 3,
                                          replace_from=0, replace_to=1)
        assert temps.tolist() == [0.5, 0.5, 1.0]


def test_empty_draft_guard():
    va.apply_empty_draft_fix()
    from vllm.v1.sample import rejection_sampler as rs

    empty = torch.empty(0, 11)
    assert rs.apply_sampling_constraints(empty, torch.zeros(2, dtype=torch.int32), None) is empty


def test_version_check_warns_or_refuses(monkeypatch):
    import vllm

    assert va.check_vllm_version() is True
    monkeypatch.setattr(vllm, "__version__", "9.9.9")
    monkeypatch.setattr(va, "_version_checked", False)
    with pytest.warns(RuntimeWarning):
        ok = va.check_vllm_version(strict=False)
    assert ok is False
    with pytest.raises(RuntimeError, match="written for vLLM"):
        va.check_vllm_version(strict=True)


def _record():
    from lkserve.capture.record import VerificationRecord

    p = 5
    return VerificationRecord(
        request_id="r", model_id="m", draft_version="v1", temperature=0.7,
        context_token_ids=np.arange(20, dtype=np.uint32), positions=np.arange(10, 15, dtype=np.uint32),
        draft_index=np.array([0, 1, 2, 0, 1], dtype=np.uint8), draft_token_ids=np.arange(p, dtype=np.uint32),
        accepted=np.array([1, 1, 0, 1, 0], dtype=bool), topk_ids=np.ones((p, 4), dtype=np.uint32),
        topk_probs=np.full((p, 4), 0.2, dtype=np.float16), residual=np.full(p, 0.2, dtype=np.float16),
        draft_probs=np.array([0.1, np.nan, 0.3, 0.4, 0.5], dtype=np.float16), tags={"a": "b"})


def test_record_wire_roundtrip_is_msgpack_safe():
    import msgspec

    rec = _record()
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(record_to_wire(rec)))
    back = record_from_wire(wire)
    for k, v in rec.__dict__.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(getattr(back, k), v)
            assert getattr(back, k).dtype == v.dtype
        else:
            assert getattr(back, k) == v


def test_checkpoint_metadata_and_checksum(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    meta = checkpoint.safetensors_meta(tmp_path)
    assert meta == {"a": ((2, 3), "F32"), "b": ((4,), "BF16")}
    assert checkpoint.checkpoint_sha256(tmp_path) == checkpoint.sha256_file(tmp_path / "model.safetensors")
    save_file({"c": torch.zeros(1)}, str(tmp_path / "model-2.safetensors"))
    assert len(checkpoint.checkpoint_sha256(tmp_path)) == 64 and "c" in checkpoint.safetensors_meta(tmp_path)


def test_make_capture_sink_memory():
    sink = make_capture_sink({"kind": "memory", "maxlen": 1}, queue_size=7)
    assert sink.put(_record()) and not sink.put(_record())
    assert len(sink.drain()) == 1
    default = make_capture_sink(None, queue_size=2)  # no spec: a memory sink of queue_size records
    assert default.put(_record()) and default.put(_record()) and not default.put(_record())
