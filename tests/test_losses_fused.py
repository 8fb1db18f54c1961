"""The fast training path computes what the reference path computes (bench/train_speed.py times them):

- lkserve.losses.sparse.fused_log_q (the sparse terms straight from the logits, its own backward) against the
  reference log_softmax / gather / scattered logsumexp path: values and gradients of every loss, fp64 and fp32, with
  and without a truncated vocabulary, k = V, padded and out-of-vocabulary ids, confident rows;
- losses.HeadRows (the LM head's inputs instead of the logits) through fused_head_log_q, a block of rows at a time,
  against the logits path: loss, d hidden and d W (trainable and frozen heads);
- the trainers' loss on the same batch of real records (tiny target, teacher-forced, T = 1, 0.7 and greedy) with
  the fused path vs the reference, in one block and in many, and the unit-temperature shortcut;
- settings.trainer.precision = "bf16": the loss within the stated 1e-3 relative of fp32 on the same batch, and the
  gradient within 2e-2 relative (bf16 has 8 mantissa bits; measured ~3e-5 / 2e-3 at the SmolLM2 sizes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lkserve.losses import (
    SparseTarget,
    core,
    kl_loss,
    lk_alpha_loss,
    lk_lambda_loss,
    per_row_terms,
    topk_target,
    tv_loss,
)

LOSSES = [lk_lambda_loss, lk_alpha_loss, kl_loss, tv_loss]


def _case(n, v, k, dtype, seed, d2t=None, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (sharp * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    vt = v if d2t is None else int(d2t.max()) + 1
    p = torch.softmax(sharp * torch.randn(n, vt, generator=g, dtype=torch.float64), -1)
    t = topk_target(p, k)
    return z, SparseTarget(t.ids, t.probs.to(dtype), t.residual.to(dtype))


def _loss_and_grad(fn, z, target, pos, fused, **kw):
    z = z.detach().clone().requires_grad_()
    old = core.FUSED_SPARSE
    core.FUSED_SPARSE = fused
    try:
        out = fn(z, target, pos, num_positions=4, **kw)
        (g,) = torch.autograd.grad(out.loss, z)
    finally:
        core.FUSED_SPARSE = old
    return out, g


def _d2t(v_draft, v_target, seed):
    return torch.sort(torch.randperm(v_target, generator=torch.Generator().manual_seed(seed))[:v_draft]).values


CASES = [  # (n, V_draft, k, truncated)
    (16, 24, 4, False),
    (16, 24, 24, False),  # k = V: every token logged, the other bucket is empty
    (64, 300, 32, False),
    (64, 300, 32, True),
    (32, 50, 50, True),  # k = V_draft but most logged ids are outside the draft vocabulary
]


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 2e-5, 1e-7)])
@pytest.mark.parametrize("n,v,k,truncated", CASES)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_fused_sparse_loss_equals_reference(fn, n, v, k, truncated, dtype, rtol, atol):
    d2t = _d2t(v, 3 * v, seed=n + v) if truncated else None
    z, target = _case(n, v, k, dtype, seed=n * 7 + k, d2t=d2t)
    pos = torch.arange(n) % 4
    ref, g_ref = _loss_and_grad(fn, z, target, pos, fused=False, d2t=d2t)
    new, g_new = _loss_and_grad(fn, z, target, pos, fused=True, d2t=d2t)
    torch.testing.assert_close(new.loss, ref.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(new.alpha_per_position, ref.alpha_per_position, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(g_new, g_ref, rtol=rtol, atol=atol)


def test_fused_handles_padding_confident_rows_and_repeated_placeholders():
    """-1 padded ids (a record with a smaller k), ids outside the draft vocabulary sharing the placeholder column 0
    with a logged id 0, and a row so confident that q_other sits at the clamp."""
    v = 40
    d2t = torch.arange(v) * 2  # draft id i = target id 2i: every odd target id is outside the draft vocabulary
    z, target = _case(8, v, 6, torch.float64, seed=3, d2t=d2t)
    ids = target.ids.clone()
    ids[0, 3:] = -1  # padding
    ids[1, :3] = torch.tensor([0, 1, 3])  # draft id 0, then two out-of-vocabulary ids (placeholder column 0 too)
    z[2] = -30.0
    z[2, target.ids[2, 0] // 2 if target.ids[2, 0] % 2 == 0 else 0] = 60.0  # confident row
    probs = target.probs.clone()
    probs[0, 3:] = 0
    t = SparseTarget(ids, probs, (1 - probs.sum(-1)).clamp_min(0))
    pos = torch.arange(8) % 4
    for fn in LOSSES:
        ref, g_ref = _loss_and_grad(fn, z, t, pos, fused=False, d2t=d2t)
        new, g_new = _loss_and_grad(fn, z, t, pos, fused=True, d2t=d2t)
        assert torch.isfinite(g_new).all()
        torch.testing.assert_close(new.loss, ref.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-14)


def test_fused_per_row_terms_can_be_told_apart_from_a_wrong_gradient():
    """The comparison above has power: the same check rejects a gradient that misses the other bucket's term."""
    z, target = _case(32, 64, 8, torch.float64, seed=11)
    z = z.requires_grad_()
    _, kl = per_row_terms(z, target, fused=True)
    (g,) = torch.autograd.grad(kl.sum(), z)
    z2 = z.detach().clone().requires_grad_()
    alpha_only = per_row_terms(z2, target, fused=True, with_kl=False)[0]  # no other bucket
    (g2,) = torch.autograd.grad(alpha_only.sum(), z2)
    assert not torch.allclose(g, g2)
    _, kl_ref = per_row_terms(z.detach().clone().requires_grad_(), target, fused=False)
    torch.testing.assert_close(kl.detach(), kl_ref.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 2e-5, 2e-7)])
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_head_rows_in_blocks_equal_the_logits_path(fn, frozen_head, dtype, rtol, atol):
    """HeadRows (hidden, head weight, per-row divisor) through fused_head_log_q in several blocks, the last one
    partial, against logits = hidden @ W.T / T through the reference path: loss, d hidden and d W."""
    from lkserve.losses import HeadRows
    from lkserve.losses import sparse as S

    g = torch.Generator().manual_seed(5)
    n, v, h = 333, 500, 24
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = 0.5 * torch.randn(v, h, generator=g, dtype=dtype)
    divisor = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.7).to(dtype)
    t = topk_target(torch.softmax(3 * torch.randn(n, v, generator=g, dtype=torch.float64), -1), 16)
    target = SparseTarget(t.ids, t.probs.to(dtype), t.residual.to(dtype))
    pos = torch.arange(n) % 4

    def run(head_rows: bool):
        hh = hidden.clone().requires_grad_()
        ww = weight.clone().requires_grad_(not frozen_head)
        old, old_block = core.FUSED_SPARSE, S.BLOCK_ROWS
        try:
            core.FUSED_SPARSE = head_rows
            S.BLOCK_ROWS = 40  # 9 blocks, the last one of 13 rows
            out = fn(HeadRows(hh, ww, divisor) if head_rows else (hh @ ww.T) / divisor[:, None], target, pos,
                     num_positions=4)
        finally:
            core.FUSED_SPARSE, S.BLOCK_ROWS = old, old_block
        grads = torch.autograd.grad(out.loss, [hh] if frozen_head else [hh, ww])
        return out.loss, grads

    ref_loss, ref_grads = run(False)
    new_loss, new_grads = run(True)
    torch.testing.assert_close(new_loss, ref_loss, rtol=rtol, atol=atol)
    for a, b in zip(new_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---- the trainers, on the same batch of real records ----

def _records(target_dir, aux_layer_ids, temperatures=(1.0,), lengths=(96,)):
    from lkserve.trainer import teacher

    rng = np.random.default_rng(0)
    model = teacher.load_target(target_dir)
    V = model.config.vocab_size
    out = []
    for i, t in enumerate(temperatures):
        for n in lengths:
            seqs = [rng.integers(3, V, n).tolist()]  # random token ids: no text corpus involved
            out += teacher.teacher_records(model, seqs, top_k=16, temperature=t, num_positions=4,
                                           aux_layer_ids=aux_layer_ids, window=n, tags={"i": str(i)})
    return out


@pytest.fixture(scope="module")
def head_dir(tiny, tmp_path_factory):
    from lkserve.models.eagle3 import build_eagle3_head

    return build_eagle3_head(tiny.target, tmp_path_factory.mktemp("fused") / "head", seed=0, draft_vocab_size=256,
                             aux_layer_ids=[0, 1, 2])


def _trainers(tiny, head_dir, precision="fp32"):
    from lkserve.models.eagle3 import load_head
    from lkserve.trainer.eagle3 import Eagle3Trainer
    from lkserve.trainer.train import DraftTrainer

    torch.manual_seed(0)
    return {"draft_model": DraftTrainer(tiny.random_draft, precision=precision),
            "eagle3": Eagle3Trainer(load_head(head_dir, tiny.target), precision=precision)}


def _batch(kind, trainer, records):
    from lkserve.trainer.examples import build_batch

    return trainer.make_batch(records) if kind == "eagle3" else build_batch(records, num_positions=4)


def _grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    out = trainer.loss_on(batch)
    out.loss.backward()
    g = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).double()
    return out.loss.detach().double(), g


@pytest.mark.parametrize("block_rows", [None, 10])
@pytest.mark.parametrize("kind", ["draft_model", "eagle3"])
def test_trainer_loss_fused_equals_reference_on_real_records(tiny, head_dir, kind, block_rows, monkeypatch):
    """The trainers hand the losses HeadRows; with FUSED_SPARSE off those become logits on the reference path."""
    from lkserve.losses import sparse as S

    if block_rows:
        monkeypatch.setattr(S, "BLOCK_ROWS", block_rows)  # many blocks instead of one
    torch.set_num_threads(1)
    records = _records(tiny.target, [0, 1, 2], temperatures=(1.0, 0.7, 0.0))
    trainer = _trainers(tiny, head_dir)[kind]
    batch = _batch(kind, trainer, records)
    assert batch.temperature.unique().numel() == 3
    old = core.FUSED_SPARSE
    try:
        core.FUSED_SPARSE = False
        l_ref, g_ref = _grads(trainer, batch)
        core.FUSED_SPARSE = True
        l_new, g_new = _grads(trainer, batch)
    finally:
        core.FUSED_SPARSE = old
    torch.testing.assert_close(l_new, l_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g_new, g_ref, rtol=1e-4, atol=1e-6)


def test_unit_temperature_skips_the_division_exactly(tiny, head_dir):
    records = _records(tiny.target, [0, 1, 2], temperatures=(1.0,))
    trainer = _trainers(tiny, head_dir)["draft_model"]
    batch = _batch("draft_model", trainer, records)
    z = torch.randn(batch.num_rows, 7)
    assert batch.scale_logits(z) is z
    assert torch.equal(z / batch.logit_temperature()[:, None], z)  # what the old path computed
    hot = _batch("draft_model", trainer, _records(tiny.target, [0, 1, 2], temperatures=(0.7,)))
    torch.testing.assert_close(hot.scale_logits(z[: hot.num_rows]), z[: hot.num_rows] / 0.7, rtol=0, atol=0)


@pytest.fixture(scope="module")
def smollm2():
    """The real sizes (SmolLM2-135M target, its 2-layer draft, the 8,192-id EAGLE-3 head): bf16's error depends on
    the model (a random tiny draft has far larger activations than a trained one), so the tolerance is stated and
    checked where it is claimed."""
    from lkserve.config import Settings
    from lkserve.models.prepare import prepare_default_models

    cache = Settings().cache_dir
    target, draft = prepare_default_models(cache)
    _, head = prepare_default_models(cache, method="eagle3")
    return target, draft, head


@pytest.mark.parametrize("kind", ["draft_model", "eagle3"])
def test_bf16_precision_stays_within_the_stated_tolerance(smollm2, kind):
    from lkserve.models.eagle3 import load_head
    from lkserve.trainer import teacher
    from lkserve.trainer.eagle3 import Eagle3Trainer
    from lkserve.trainer.train import DraftTrainer

    torch.set_num_threads(1)
    target, draft, head = smollm2
    records = _records(target, teacher.aux_layers_of(head), temperatures=(1.0, 0.7))
    make = {"draft_model": lambda p: DraftTrainer(draft, precision=p),
            "eagle3": lambda p: Eagle3Trainer(load_head(head, target), precision=p)}[kind]
    fp32, bf16 = make("fp32"), make("bf16")
    batch = _batch(kind, fp32, records)
    l32, g32 = _grads(fp32, batch)
    l16, g16 = _grads(bf16, batch)
    assert l32 != l16  # bf16 really ran (equal would mean autocast did nothing)
    assert abs(l16 - l32) / abs(l32) < 1e-3
    assert (g16 - g32).norm() / g32.norm() < 2e-2


def test_precision_is_checked():
    from lkserve.config import TrainerSettings
    from lkserve.trainer.train import autocast

    with pytest.raises(ValueError):
        autocast(torch.nn.Linear(2, 2), "fp8")
    with pytest.raises(ValueError):
        TrainerSettings(precision="fp16")


@pytest.mark.parametrize("kind", ["draft_model", "eagle3"])
def test_records_run_one_by_one_give_the_batched_rows(tiny, head_dir, kind, monkeypatch):
    """Records of very different lengths (a padded batch) run one by one, each cut to what its rows need: the same
    head inputs as the padded batch, and the trainer's loss on the batch unchanged."""
    from lkserve.trainer import eagle3, examples, train

    torch.set_num_threads(1)
    records = _records(tiny.target, [0, 1, 2], lengths=(96, 20, 57))
    trainer = _trainers(tiny, head_dir)[kind]
    batch = _batch(kind, trainer, records)
    hidden = (lambda: eagle3.row_hidden(trainer.model, batch, 4)) if kind == "eagle3" else \
        (lambda: train.row_hidden(trainer.model, batch))
    results = {}
    for waste, name in ((1.0, "batched"), (0.0, "per_record")):
        monkeypatch.setattr(examples, "PACK_WASTE", waste)
        with torch.no_grad():
            results[name] = hidden()
        results[name + "_loss"] = _grads(trainer, batch)
    need = examples.needed_lengths(batch.row_b, batch.row_j if kind == "eagle3" else batch.row_t, batch.num_records)
    padded = batch.aux.shape[1] if kind == "eagle3" else batch.input_ids.shape[1]
    assert examples.per_record(need, padded)  # at PACK_WASTE 0 this batch does take the per-record path
    torch.testing.assert_close(results["per_record"], results["batched"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["per_record_loss"][0], results["batched_loss"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results["per_record_loss"][1], results["batched_loss"][1], rtol=1e-4, atol=1e-6)
