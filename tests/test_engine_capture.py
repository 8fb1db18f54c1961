"""What the engine captures at verification time: the target's distribution exactly, every verified position once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import CAPTURE_TOP_K, CHUNK_POSITIONS, K, prompt_ids

pytestmark = pytest.mark.slow


def _sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


def _records_for(records, request_id):
    recs = [r for r in records if r.request_id == request_id]
    return sorted(recs, key=lambda r: int(r.positions[0]))


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _hf_dist(model, context, temperature, top_k=None):
    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in context]])).logits[0, -1].to(torch.float64) / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.tensor(float("-inf"), dtype=logits.dtype), logits)
    return torch.softmax(logits, -1).numpy()


@pytest.mark.parametrize("temperature,top_k", [(0.8, 0), (1.3, 5)])
def test_captured_distribution_matches_transformers(spec_engine, tiny, temperature, top_k):
    spec_engine.use_draft("random")
    spec_engine.drain()
    prompt = prompt_ids(spec_engine, 3)[2]
    res = spec_engine.generate(prompt, _sp(temperature=temperature, top_k=top_k, max_tokens=24, seed=3))
    recs = _records_for(spec_engine.drain(), res.request_id)
    assert recs, "no record for a captured request"
    target, draft = _hf(tiny.target), _hf(tiny.random_draft)
    checked = 0
    for rec in recs:
        assert rec.temperature == pytest.approx(temperature)
        assert rec.top_k == (top_k if top_k else -1)
        assert rec.topk_ids.shape == (rec.num_positions, CAPTURE_TOP_K)
        for i, pos in enumerate(rec.positions.tolist()):
            ctx = rec.context_token_ids[:pos]
            p = _hf_dist(target, ctx, temperature, top_k or None)
            ids = rec.topk_ids[i].astype(np.int64)
            probs = rec.topk_probs[i].astype(np.float64)
            np.testing.assert_allclose(probs, p[ids], atol=1e-3)
            assert ids[0] == int(np.argmax(p))
            assert float(rec.residual[i]) == pytest.approx(max(0.0, 1.0 - p[ids].sum()), abs=1e-3)
            if top_k:  # the sampler's top-k: only top_k tokens carry mass
                assert (probs[top_k:] == 0).all() and probs[:top_k].sum() == pytest.approx(1.0, abs=2e-3)
            # q(draft token): the draft's distribution on the same context at the request's temperature (vLLM's
            # drafter ignores top-k/top-p: lossless anyway, the rejection sampler corrects for it)
            q = _hf_dist(draft, ctx, temperature)
            assert float(rec.draft_probs[i]) == pytest.approx(q[int(rec.draft_token_ids[i])], abs=2e-3)
            checked += 1
    assert checked >= 10


def _expected_positions(prompt_len: int, spec) -> list[int]:
    """From vLLM's per-request stats alone: the first verify step drafts right after the prefill's token; a step
    with a accepted drafts emits a+1 tokens; verified positions are the first min(a+1, drafted) of each step."""
    out = []
    start = prompt_len + 1
    for a, d in zip(spec.per_step_accepted, spec.per_step_drafted):
        out.extend(range(start, start + min(a + 1, d)))
        start += a + 1
    return out


@pytest.mark.parametrize("draft", ["random", "target"])
def test_records_cover_every_verified_position(spec_engine, draft):
    spec_engine.use_draft(draft)
    spec_engine.drain()
    prompts = prompt_ids(spec_engine, 4)
    jobs = [(p, _sp(temperature=t, max_tokens=70, seed=11 + i), {"tags": {"case": f"c{i}"}})
            for i, (p, t) in enumerate(zip(prompts, [0.0, 0.7, 1.0, 1.5]))]
    results = spec_engine.generate_many(jobs)
    records = spec_engine.drain()
    for (prompt, sp, kw), res in zip(jobs, results):
        recs = _records_for(records, res.request_id)
        spec = res.spec
        positions = np.concatenate([r.positions for r in recs]).astype(int)
        accepted = np.concatenate([r.accepted for r in recs])
        # the identity with vLLM's own per-request stats
        assert len(positions) == spec.verified_positions == sum(
            min(a + 1, d) for a, d in zip(spec.per_step_accepted, spec.per_step_drafted))
        assert int(accepted.sum()) == spec.accepted
        assert positions.tolist() == _expected_positions(len(prompt), spec)
        # chunks of exactly CHUNK_POSITIONS, the last one shorter
        sizes = [r.num_positions for r in recs]
        assert all(s == CHUNK_POSITIONS for s in sizes[:-1]) and 0 < sizes[-1] <= CHUNK_POSITIONS
        full = np.asarray(prompt + res.token_ids)
        for r in recs:
            ctx = r.context_token_ids.astype(int)
            assert len(ctx) == int(r.positions[-1]) + 1  # prompt + emitted tokens up to the last position
            # the last step may emit up to K tokens past max_tokens: vLLM truncates what the client sees, but
            # the target did verify them, so the record keeps them
            m = min(len(ctx), len(full))
            assert (ctx[:m] == full[:m]).all() and len(ctx) <= len(full) + K
            drafted = r.draft_token_ids.astype(int)
            at = ctx[r.positions.astype(int)]
            assert (at[r.accepted] == drafted[r.accepted]).all()  # accepted: the draft's token was emitted
            assert (at[~r.accepted] != drafted[~r.accepted]).all()  # rejected: something else was
            assert r.draft_version == draft
            assert r.model_id == spec_engine.engine.model_id
            assert r.tags == kw["tags"]
            assert r.temperature == pytest.approx(sp.temperature)
            if sp.temperature > 0:  # probabilistic draft: q is known (NaN only in all-greedy batches)
                assert np.isfinite(r.draft_probs.astype(np.float32)).all()
            assert (np.diff(r.topk_probs.astype(np.float32), axis=1) <= 1e-3).all()  # sorted
    assert len(records) == sum(len(_records_for(records, r.request_id)) for r in results)


def test_opt_out_and_sample_rate(spec_engine):
    spec_engine.use_draft("random")
    engine = spec_engine.engine
    spec_engine.drain()
    prompt = prompt_ids(spec_engine, 1)[0]
    sp = _sp(temperature=1.0, max_tokens=12, seed=5)
    out, keep = spec_engine.generate_many([(prompt, sp, {"capture": False}), (prompt, sp, {"capture": True})])
    ids = {r.request_id for r in spec_engine.drain()}
    assert out.request_id not in ids and keep.request_id in ids
    assert out.spec.drafted > 0  # it was speculated, just not recorded
    try:
        # switched off at run time
        assert spec_engine.run(engine.set_capture(False))["ok"]
        spec_engine.generate(prompt, sp)
        assert spec_engine.drain() == []
        # sample rate 0: nothing; 0.5: a reproducible subset decided per request id
        spec_engine.run(engine.set_capture(True, 0.0))
        spec_engine.generate(prompt, sp)
        assert spec_engine.drain() == []
        spec_engine.run(engine.set_capture(True, 0.5))
        rids = [f"rate-{i}" for i in range(24)]
        spec_engine.generate_many([(prompt, _sp(temperature=1.0, max_tokens=6, seed=i), {"request_id": r})
                                   for i, r in enumerate(rids)])
        first = {r.request_id for r in spec_engine.drain()}
        assert 0 < len(first) < len(rids)
        spec_engine.generate_many([(prompt, _sp(temperature=1.0, max_tokens=6, seed=i), {"request_id": r})
                                   for i, r in enumerate(rids)])
        assert {r.request_id for r in spec_engine.drain()} == first
        assert spec_engine.run(engine.set_capture(True, 2.0))["ok"] is False  # refused, nothing changed
    finally:
        spec_engine.run(engine.set_capture(True, 1.0))
    info = spec_engine.run(engine.info())["capture"]
    assert info["errors"] == 0 and info["fallback_logits"] == 0
