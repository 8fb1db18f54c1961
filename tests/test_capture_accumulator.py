"""The capture accumulator without vLLM: verification steps and forwards built by hand, records read from a sink.

A step mimics what the rejection sampler leaves: request i drafted n_i tokens, accepted a_i of them, and emitted
a_i + 1 tokens (sampled_token_ids row: a_i + 1 ids then -1). The test appends those tokens to the request's output,
as vLLM does, so positions advance like in a running engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lkserve.capture.accumulator import CaptureState, HiddenStep, RequestAcc, RequestInfo, VerifyStep
from lkserve.capture.record import hidden_states_array
from lkserve.capture.sink import MemorySink
from lkserve.config import CaptureSettings

V, K = 16, 3


class Engine:
    """Requests by internal id, and one step at a time."""

    def __init__(self, settings: CaptureSettings, sink=None, seed: int = 0):
        self.requests: dict[str, RequestInfo] = {}
        self.sink = sink if sink is not None else MemorySink(10_000)
        self.cap = CaptureState(settings, self.sink, model_id="m", seed=seed, draft_version="v1")
        self.gen = torch.Generator().manual_seed(0)
        self.logits: list[torch.Tensor] = []  # target logits of every step, for checking the records

    def add(self, rid: str, prompt_len: int = 6, **kw) -> RequestInfo:
        info = RequestInfo(request_id=f"ext-{rid}", prompt_token_ids=list(range(1, prompt_len + 1)),
                           output_token_ids=[], **kw)
        self.requests[rid] = info
        return info

    def step(self, accepted: dict[str, int], n: int = K, draft_probs: bool = True) -> VerifyStep:
        rids = list(accepted)
        N = n * len(rids)
        sampled = np.full((len(rids), n + 1), -1, dtype=np.int64)
        for i, rid in enumerate(rids):
            sampled[i, : accepted[rid] + 1] = 7
        logits = torch.randn(N, V, generator=self.gen)
        q = torch.softmax(torch.randn(N, V, generator=self.gen), -1) if draft_probs else None
        step = VerifyStep(req_ids=rids, num_draft_tokens=[n] * len(rids), sampled_token_ids=sampled,
                          draft_token_ids=torch.randint(0, V, (N,), generator=self.gen), target_logits=logits,
                          draft_probs=q)
        self.cap.guarded("capture hook", self.cap.on_step, step, self.requests.get)
        for rid in rids:
            self.requests[rid].output_token_ids.extend([7] * (accepted[rid] + 1))
        return step

    def finish(self, *rids: str) -> list:
        self.cap.before_step(rids, self.requests.get)
        for rid in rids:
            del self.requests[rid]
        return self.sink.drain()


def _settings(**kw) -> CaptureSettings:
    return CaptureSettings(**{"top_k": 4, "max_positions_per_record": 512, **kw})


def test_only_verified_positions_are_kept_with_the_target_top_k():
    e = Engine(_settings())
    e.add("a", prompt_len=6, temperature=0.7, top_p=0.9, top_k=5, tags={"domain": "code"})
    step = e.step({"a": 1})  # 1 of 3 accepted: drafts 0 and 1 were verified, draft 2 never looked at
    [rec] = e.finish("a")
    assert rec.request_id == "ext-a" and rec.model_id == "m" and rec.draft_version == "v1"
    assert (rec.temperature, rec.top_p, rec.top_k, rec.tags) == (pytest.approx(0.7), pytest.approx(0.9), 5,
                                                                 {"domain": "code"})
    assert rec.positions.tolist() == [6, 7] and rec.draft_index.tolist() == [0, 1]
    assert rec.accepted.tolist() == [True, False]
    assert rec.draft_token_ids.tolist() == step.draft_token_ids[:2].tolist()
    probs = torch.softmax(step.target_logits[:2], -1)
    top = probs.topk(4, -1)
    np.testing.assert_array_equal(rec.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(rec.topk_probs.astype(np.float32), top.values.numpy(), atol=1e-3)
    np.testing.assert_allclose(rec.residual.astype(np.float32), 1 - top.values.sum(-1).numpy(), atol=2e-3)
    q = step.draft_probs[torch.arange(2), step.draft_token_ids[:2]]
    np.testing.assert_allclose(rec.draft_probs.astype(np.float32), q.numpy(), atol=1e-3)
    assert rec.context_token_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 7]  # up to the last position, inclusive


def test_fully_rejected_step_keeps_its_first_draft_and_unknown_draft_probs_are_nan():
    e = Engine(_settings())
    e.add("a")
    e.step({"a": 0}, draft_probs=False)
    [rec] = e.finish("a")
    assert rec.positions.tolist() == [6] and rec.accepted.tolist() == [False]
    assert np.isnan(rec.draft_probs.astype(np.float32)).all()


def test_requests_in_one_batch_get_their_own_rows():
    e = Engine(_settings())
    e.add("a")
    e.add("b", prompt_len=3)
    step = e.step({"a": 3, "b": 0})  # a: all 3 accepted (+ bonus token); b: first draft rejected
    recs = {r.request_id: r for r in e.finish("a", "b")}
    assert recs["ext-a"].positions.tolist() == [6, 7, 8] and recs["ext-a"].accepted.all()
    assert recs["ext-b"].positions.tolist() == [3]
    assert recs["ext-b"].draft_token_ids.tolist() == [int(step.draft_token_ids[K])]  # b's rows start at K


def test_long_requests_are_cut_into_records_of_the_size_limit():
    e = Engine(_settings(max_positions_per_record=4))
    e.add("a")
    for _ in range(3):
        e.step({"a": 2})  # 3 verified positions per step: 9 in all
    assert e.cap.pending_chunks == {"a"}
    e.cap.before_step((), e.requests.get)  # the next engine step: full chunks only
    full = e.sink.drain()
    assert [r.num_positions for r in full] == [4, 4]
    assert e.cap.accs["a"].n == 1 and not e.cap.pending_chunks
    e.step({"a": 0})
    [last] = e.finish("a")
    positions = np.concatenate([r.positions for r in full + [last]]).tolist()
    assert positions == list(range(6, 6 + 9)) + [15]  # contiguous across records and steps
    assert [r.positions[-1] + 1 == len(r.context_token_ids) for r in full + [last]] == [True] * 3
    assert e.cap.info()["records"] == 3 and e.cap.info()["positions"] == 10
    assert "a" not in e.cap.accs  # finished: forgotten


def test_sample_rate_and_opt_out():
    e = Engine(_settings(sample_rate=0.0))
    e.add("a")
    e.step({"a": 1})
    assert e.finish("a") == [] and e.cap.accs == {}

    e = Engine(_settings(sample_rate=1.0))
    e.add("a", capture=False)  # opted out: never recorded, whatever the rate
    e.step({"a": 1})
    assert e.finish("a") == []

    e = Engine(_settings(sample_rate=0.5), seed=3)
    ids = [str(i) for i in range(400)]
    for rid in ids:
        e.add(rid)
    e.step(dict.fromkeys(ids, 1))
    got = {r.request_id for r in e.finish(*ids)}
    assert 150 < len(got) < 250  # about half
    assert got == {f"ext-{i}" for i in ids if e.cap.sampled(f"ext-{i}")}  # reproducible per request id
    other = CaptureState(_settings(sample_rate=0.5), MemorySink(), seed=4)
    assert {i for i in ids if other.sampled(f"ext-{i}")} != {i for i in ids if e.cap.sampled(f"ext-{i}")}


def test_set_enabled_flushes_and_decides_again():
    e = Engine(_settings(sample_rate=0.0))
    e.add("a")
    e.step({"a": 1})
    e.cap.set_enabled(True, 1.0, e.requests.get)
    e.step({"a": 1})
    [rec] = e.finish("a")
    assert rec.positions.tolist() == [8, 9]  # from the step after the rate changed


def test_tracked_requests_are_capped():
    e = Engine(_settings(max_tracked_requests=2))
    for rid in "abc":
        e.add(rid)
    e.step({"a": 0, "b": 0, "c": 0})
    assert sorted(r.request_id for r in e.finish("a", "b", "c")) == ["ext-a", "ext-b"]


def test_finish_by_external_id_flushes_before_the_engine_reports_it():
    e = Engine(_settings())
    e.add("a")
    e.step({"a": 1})
    e.cap.finish_external(["ext-a"], e.requests.get)
    assert [r.request_id for r in e.sink.drain()] == ["ext-a"]
    assert e.cap.accs["a"] is None  # never tracked again
    e.step({"a": 1})
    assert e.finish("a") == []


def test_errors_are_contained_and_counted():
    class Broken:
        def put(self, rec):
            raise OSError("redis down")

    e = Engine(_settings(), sink=Broken())
    e.add("a")
    e.step({"a": 1})
    e.cap.before_step(["a"], e.requests.get)
    assert e.cap.stats["errors"] == 1 and e.cap.stats["dropped"] == 1 and e.cap.stats["records"] == 0

    e = Engine(_settings())
    e.add("a")
    bad = VerifyStep(req_ids=["a"], num_draft_tokens=[K], sampled_token_ids=np.zeros((1, K + 1), dtype=np.int64),
                     draft_token_ids=torch.zeros(1, dtype=torch.long), target_logits=torch.zeros(1, V))
    e.cap.guarded("capture hook", e.cap.on_step, bad, e.requests.get)  # rows beyond the tensors: an IndexError
    e.cap.guarded("capture hook", e.cap.on_step, bad, e.requests.get)
    assert e.cap.stats["errors"] == 2 and e.cap.stats["hook_seconds"] > 0

    full = Engine(_settings(), sink=MemorySink(maxlen=1))
    full.add("a")
    full.add("b")
    full.step({"a": 0, "b": 0})
    assert len(full.finish("a", "b")) == 1 and full.cap.stats["dropped"] == 1


def _hidden(positions: list[int]) -> HiddenStep:
    """Two aux layers, H=2: row of position p is [10p, 10p+1 | 10p+2, 10p+3] (exact in bf16 for small p)."""
    pos = torch.tensor(positions)
    base = pos.to(torch.float32).unsqueeze(1) * 10
    return HiddenStep(req_ids=["a"], starts=[0], counts=[len(positions)],
                      hidden=[base + torch.tensor([0.0, 1.0]), base + torch.tensor([2.0, 3.0])], positions=pos)


def _rows(start: int, end: int) -> np.ndarray:
    p = np.arange(start, end, dtype=np.float32)[:, None] * 10
    return p + np.arange(4, dtype=np.float32)


def test_hidden_window_and_trimming():
    e = Engine(_settings(hidden_states=True, hidden_context=3))
    e.add("a", prompt_len=6)
    e.cap.on_hidden(_hidden(list(range(6))), e.requests.get)  # prefill: positions 0..5
    e.step({"a": 1})  # verified positions 6, 7
    e.cap.on_hidden(_hidden([6, 7]), e.requests.get)
    e.cap.flush("a", True, e.requests.get)
    [rec] = e.sink.drain()
    # rows [first - 1 - hidden_context, last - 1) = [2, 6): the head's input up to the record's last position
    assert rec.hidden_start == 2 and rec.hidden_dtype == "bf16"
    np.testing.assert_array_equal(hidden_states_array(rec), _rows(2, 6))
    assert e.cap.accs["a"].hid_base == 7 - 3 - 1  # rows no later record can need are gone
    assert e.cap.stats["hidden_rows"] == 8


def test_hidden_window_skips_positions_never_computed():
    acc = RequestAcc("a", RequestInfo("a", [1] * 10, []))
    words = np.arange(24, dtype=np.uint16).reshape(12, 2)
    acc.put_hidden(5, words[5:10])  # a prefix-cache hit: positions 0..4 never computed for this request
    assert acc.hidden_window(2, 9)[0] == 5
    assert acc.hidden_window(0, 11) is None  # the last row is unknown
    acc.put_hidden(7, words[:2])  # a recomputed position overwrites (later writes win)
    _, rows = acc.hidden_window(5, 10)
    np.testing.assert_array_equal(rows, np.concatenate([words[5:7], words[:2], words[9:10]]))
    acc.trim_hidden(8)
    assert acc.hid_base == 8 and acc.hidden_window(5, 10)[0] == 8
    acc.put_hidden(6, words[6:9])  # rows before the window are dropped
    np.testing.assert_array_equal(acc.hidden_window(8, 9)[1], words[8:9])


def test_record_without_hidden_rows_is_still_emitted_and_counted():
    e = Engine(_settings(hidden_states=True, hidden_context=3))
    e.add("a")
    e.step({"a": 1})
    [rec] = e.finish("a")
    assert rec.hidden_states is None and e.cap.stats["hidden_unavailable"] == 1
