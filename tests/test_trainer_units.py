"""Worker units on real records from the tiny target: examples, train step, gate (no Redis, no engine)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from lkserve.trainer.examples import build_batch, split_by_positions
from lkserve.trainer.gate import Gate, chain_tau, evaluate, summarise
from lkserve.trainer.train import DraftTrainer, load_draft, row_logits
from tests.test_trainer_data import make_records, shuffled

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recs(tiny):
    return make_records(tiny.target, n_requests=96, seed=0, gen_len=48)


@pytest.fixture(scope="module")
def recs_full_vocab(tiny):
    """k = V: the logged top-k is the whole distribution."""
    return make_records(tiny.target, n_requests=6, seed=5, gen_len=16, k=10_000)


def test_batch_rows_map_to_the_right_logits(tiny, recs_full_vocab):
    """With draft = target, the draft's row for a logged position reproduces the logged distribution."""
    model = load_draft(tiny.copy_draft)
    recs = recs_full_vocab[:3]
    batch = build_batch(recs)
    assert batch.num_rows == sum(r.num_positions for r in recs)
    with torch.no_grad():
        q = torch.softmax(row_logits(model, batch), -1)
    p = torch.zeros_like(q).scatter_(1, batch.target.ids, batch.target.probs)
    assert (q - p).abs().max() < 2e-3  # fp16 logging


def test_left_aligned_padding_and_context_window(recs):
    short = [recs[0], recs[1]]
    import dataclasses

    short[1] = dataclasses.replace(recs[1], positions=recs[1].positions[:5], draft_index=recs[1].draft_index[:5],
                                   draft_token_ids=recs[1].draft_token_ids[:5], accepted=recs[1].accepted[:5],
                                   topk_ids=recs[1].topk_ids[:5], topk_probs=recs[1].topk_probs[:5],
                                   residual=recs[1].residual[:5], draft_probs=recs[1].draft_probs[:5])
    b = build_batch(short)
    assert b.attention_mask[1].sum() == int(short[1].positions.max())  # context up to the last position
    assert b.attention_mask[1, int(short[1].positions.max()):].sum() == 0
    w = build_batch([recs[0]], max_context=20)  # positions 16..63: only prefixes inside the last 20 tokens
    assert w.input_ids.shape[1] == 20 and w.num_rows == 20 and w.dropped_positions == 28
    assert torch.equal(w.input_ids[0], torch.from_numpy(recs[0].context_token_ids[43:63].astype(np.int64)))


def test_gate_alpha_equals_dense_when_k_is_vocab(tiny, recs_full_vocab):
    model = load_draft(tiny.random_draft)
    res = evaluate(model, recs_full_vocab, num_positions=4)
    batch = build_batch(recs_full_vocab)
    with torch.no_grad():
        q = torch.softmax(row_logits(model, batch).double(), -1)
    p = torch.zeros_like(q).scatter_(1, batch.target.ids, batch.target.probs.double())
    dense = torch.minimum(p, q).sum(-1)
    for n in range(4):
        assert res.alpha_per_position[n] == pytest.approx(float(dense[batch.draft_position == n].mean()), abs=1e-5)
    assert res.alpha_mean == pytest.approx(float(dense.mean()), abs=1e-5)
    assert res.tau == pytest.approx(chain_tau(res.alpha_per_position))


def test_an_evaluation_with_an_unreached_position_survives_a_save_and_reload(tmp_path):
    """A draft position with no held-out rows is NaN in the result but None in its dict, so the dict is valid JSON
    and a bootstrap resumed from its saved state compares equal to the uninterrupted run (NaN != NaN)."""
    res = summarise(torch.tensor([0.2, 0.4, 0.1]), torch.tensor([0, 0, 1]), num_positions=3)
    assert math.isnan(res.alpha_per_position[2]) and res.count_per_position == [2, 1, 0]
    d = res.as_dict()
    assert d["alpha_per_position"] == [pytest.approx(0.3), pytest.approx(0.1), None]
    json.dumps(d, allow_nan=False)
    torch.save(d, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt") == d
    assert chain_tau(d["alpha_per_position"]) == pytest.approx(res.tau)


def test_chain_tau():
    assert chain_tau([1, 1, 1, 1]) == 5
    assert chain_tau([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert chain_tau([0.5, float("nan"), 0.9]) == pytest.approx(1.5)


def test_train_step_improves_training_alpha(tiny, recs):
    tr = DraftTrainer(tiny.random_draft, loss="lk_lambda", lr=3e-3, train_params="all", num_positions=4)
    batches = [build_batch(g) for g in split_by_positions(recs[:64], 512)]
    first = tr.step(batches[0])
    assert first.lambda_per_position is not None and len(first.alpha_per_position) == 4
    for _ in range(3):
        for b in batches:
            last = tr.step(b)
    a0, a1 = np.mean(first.alpha_per_position), np.mean(last.alpha_per_position)
    print(f"\ntrain alpha {a0:.3f} -> {a1:.3f}")
    assert a1 > a0 + 0.05


def test_trainable_selection(tiny):
    tr = DraftTrainer(tiny.random_draft, train_params="layers")
    assert all(".layers." in n or n == "model.norm.weight" for n in tr.trainable)
    assert not any("embed" in n or "lm_head" in n for n in tr.trainable)
    tr2 = DraftTrainer(tiny.random_draft, train_params="layers+head")
    assert "lm_head.weight" in tr2.trainable  # the tiny draft's head is untied


def test_gate_refuses_a_worse_candidate(tiny, recs):
    """Serving: a good draft (the target's own weights). Candidate: that draft trained further on a stream with
    scrambled labels. The gate refuses it and the serving version stays; a real improvement passes."""
    train, heldout = recs[:72], recs[72:]
    serving = load_draft(tiny.copy_draft)
    bad = DraftTrainer(tiny.copy_draft, train_params="all", lr=3e-3)
    for g in split_by_positions(shuffled(train, seed=1), 512):
        bad.step(build_batch(g))
    gate = Gate(margin=0.005, min_rows=64)
    d = gate.decide(bad.model, serving, heldout)
    print(f"\nserving held-out alpha {d.serving.alpha_mean:.3f}, scrambled-trained candidate {d.candidate.alpha_mean:.3f}")
    assert not d.publish and d.candidate.alpha_mean < d.serving.alpha_mean - 0.05
    assert not gate.decide(serving, serving, heldout).publish  # equal is not better
    # a real improvement passes: random draft trained on the real stream vs the untrained random draft
    good = DraftTrainer(tiny.random_draft, train_params="all", lr=3e-3)
    for _ in range(2):
        for g in split_by_positions(train, 512):
            good.step(build_batch(g))
    d2 = gate.decide(good.model, load_draft(tiny.random_draft), heldout)
    print(f"random draft held-out alpha {d2.serving.alpha_mean:.3f} -> trained {d2.candidate.alpha_mean:.3f}")
    assert d2.publish, d2.reason
    assert not Gate(min_rows=10_000).decide(good.model, load_draft(tiny.random_draft), heldout).publish
    assert not math.isnan(d.candidate.tau)


def test_eagle3_versions_keep_the_base_heads_config_dtype_and_vocabulary(tiny, tmp_path):
    """A head version is the base head's config.json plus the trained weights in the base head's dtype, d2t/t2d
    included, and it loads back to the trained weights."""
    from safetensors import safe_open

    from lkserve.config import EngineSettings, Settings
    from lkserve.models.eagle3 import build_eagle3_head
    from lkserve.trainer.drafts import Eagle3Ops, ops_for

    base = build_eagle3_head(tiny.target, tmp_path / "base", draft_vocab_size=256, aux_layer_ids=[0, 1, 2],
                             dtype=torch.bfloat16)
    settings = Settings(cache_dir=tmp_path, engine=EngineSettings(method="eagle3", draft_model=str(base),
                                                                  target_model=str(tiny.target)))
    ops = ops_for(settings)
    assert isinstance(ops, Eagle3Ops) and ops.num_positions == settings.engine.num_speculative_tokens
    head = ops.load(base)
    with torch.no_grad():
        head.fc.weight.add_(0.25)
    out = tmp_path / "v0001"
    out.mkdir()
    ops.save(head, out, base)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 - safe_open has no __contains__
    assert dtypes["fc.weight"] == torch.bfloat16 and dtypes["d2t"] == torch.long and dtypes["t2d"] == torch.bool
    back = ops.load(out)
    assert torch.equal(back.d2t, head.d2t) and torch.equal(back.t2d, head.t2d)
    assert torch.allclose(back.fc.weight, head.fc.weight, atol=0.02)
    assert not torch.allclose(back.fc.weight, ops.load(base).fc.weight, atol=0.1)
    with pytest.raises(ValueError, match="target_model"):
        ops_for(Settings(cache_dir=tmp_path, engine=EngineSettings(method="eagle3", draft_model=str(base))))
    with pytest.raises(ValueError, match="ngram"):
        ops_for(Settings(cache_dir=tmp_path, engine=EngineSettings(method="ngram", draft_model=str(base))))


def test_both_trainer_kinds_follow_the_configured_lr_schedule(tiny, eagle3_heads):
    """`trainer.lr_schedule = cosine` reaches the EAGLE-3 head's trainer as it does the draft model's (it used to
    train the head at a constant lr whatever the setting said): warm-up, then cosine to min_lr_ratio at total_steps."""
    from lkserve.config import EngineSettings, Settings, TrainerSettings
    from lkserve.trainer.drafts import ops_for

    trainer_cfg = TrainerSettings(lr=1e-2, lr_schedule="cosine", total_steps=20, warmup_steps=4)
    heads = {"draft_model": tiny.random_draft, "eagle3": eagle3_heads.random}
    for method, start in heads.items():
        settings = Settings(engine=EngineSettings(method=method, target_model=str(tiny.target),
                                                  draft_model=str(start)), trainer=trainer_cfg)
        trainer = ops_for(settings).trainer(start)
        lrs = [trainer.lr_at(s) for s in range(30)]
        assert lrs[0] == pytest.approx(2.5e-3) and lrs[3] == pytest.approx(1e-2), method  # warm-up
        assert lrs[4] == pytest.approx(1e-2) and lrs[12] == pytest.approx(5.5e-3), method  # half-way: (1 + 0.1) / 2
        assert all(a >= b for a, b in itertools.pairwise(lrs[4:])), method
        assert lrs[20] == pytest.approx(1e-3) and lrs[29] == pytest.approx(1e-3), method  # held at min_lr_ratio
