"""lkserve.losses: gradients, bounds, sparse/dense agreement, truncated vocabularies, masking, numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

from lkserve.losses import (
    SparseTarget,
    acceptance,
    d2t_from_offsets,
    d2t_to_offsets,
    kl_loss,
    lk_alpha_loss,
    lk_lambda_loss,
    per_row_terms,
    target_to_draft_ids,
    topk_target,
    tv_loss,
)

LOSSES = [lk_alpha_loss, lk_lambda_loss, kl_loss, tv_loss]
f64 = torch.float64


def rand_case(n=8, v=16, seed=0, dtype=f64, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (sharp * torch.randn(n, v, generator=g, dtype=f64)).to(dtype).requires_grad_()
    p = torch.softmax(sharp * torch.randn(n, v, generator=g, dtype=f64), -1)
    return logits, p


def grad_of(loss_fn, logits, *args, **kw):
    logits = logits.detach().clone().requires_grad_()
    out = loss_fn(logits, *args, **kw)
    (g,) = torch.autograd.grad(out.loss, logits)
    return out, g


def zeros(n):
    return torch.zeros(n, dtype=torch.long)


# ---- gradients (fp64, one draft position so every loss is a plain mean over rows) ----

def test_grad_lk_alpha_is_grad_tv_over_alpha():
    logits, p = rand_case()
    pos = zeros(len(p))
    _, g_alpha = grad_of(lk_alpha_loss, logits, p, pos)
    _, g_tv = grad_of(tv_loss, logits, p, pos)
    alpha = acceptance(p, torch.softmax(logits.detach(), -1))  # [N]
    torch.testing.assert_close(g_alpha, g_tv / alpha[:, None], rtol=1e-10, atol=1e-12)


def test_grad_tv_closed_form():
    logits, p = rand_case(seed=1)
    n = len(p)
    _, g_tv = grad_of(tv_loss, logits, p, zeros(n))
    q = torch.softmax(logits.detach(), -1)
    s = torch.sign(q - p)
    expected = 0.5 * q * (s - (q * s).sum(-1, keepdim=True)) / n  # / n: the loss is the mean over rows
    torch.testing.assert_close(g_tv, expected, rtol=1e-10, atol=1e-12)


def test_grad_kl_is_q_minus_p():
    logits, p = rand_case(seed=2)
    n = len(p)
    _, g_kl = grad_of(kl_loss, logits, p, zeros(n))
    torch.testing.assert_close(g_kl, (torch.softmax(logits.detach(), -1) - p) / n, rtol=1e-10, atol=1e-12)


def test_lk_alpha_equals_cross_entropy_for_one_hot():
    logits, _ = rand_case(seed=3)
    y = torch.randint(0, logits.shape[1], (len(logits),), generator=torch.Generator().manual_seed(3))
    p = F.one_hot(y, logits.shape[1]).to(f64)
    out, g = grad_of(lk_alpha_loss, logits, p, zeros(len(y)))
    ce = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ce, y)
    (g_ref,) = torch.autograd.grad(ref, ce)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(g, g_ref)
    # sparse top-1 target is the same one-hot
    out_s = lk_alpha_loss(logits, SparseTarget(y[:, None], torch.ones(len(y), 1, dtype=f64), zeros(len(y)).to(f64)),
                          zeros(len(y)))
    torch.testing.assert_close(out_s.loss, ref)


def test_lk_alpha_far_from_target_fp32():
    # fp32, one-hot p, q(x) = e^-60: still the exact CE value and gradient. Below fp32's smallest normal
    # (q(x) = e^-200) alpha is clamped: finite loss 87.5, finite (zero) gradient.
    v = 8
    p = F.one_hot(torch.tensor([0]), v).float()
    for gap, expected in [(60.0, 60.0), (200.0, -math.log(1e-38))]:
        logits = torch.zeros(1, v)
        logits[0, 1] = gap
        out, g = grad_of(lk_alpha_loss, logits, p, zeros(1))
        torch.testing.assert_close(out.loss, torch.tensor(expected), rtol=1e-5, atol=1e-3)
        assert torch.isfinite(g).all()
        if gap == 60.0:
            torch.testing.assert_close(g, torch.softmax(logits, -1) - p)


def test_lambda_limits():
    v, n = 32, 4
    p = F.one_hot(torch.zeros(n, dtype=torch.long), v).to(f64)
    pos = zeros(n)
    far = torch.zeros(n, v, dtype=f64)
    far[:, 1] = 60.0  # q(0) ~ e^-60: alpha -> 0
    near = torch.full((n, v), -60.0, dtype=f64)
    near[:, 0] = 0.0  # q(0) ~ 1: alpha -> 1
    for eta in (1.0, 3.0, 30.0):
        lam_far = lk_lambda_loss(far, p, pos, eta=eta).lambda_per_position
        lam_near = lk_lambda_loss(near, p, pos, eta=eta).lambda_per_position
        torch.testing.assert_close(lam_far, torch.ones(1, dtype=f64))
        torch.testing.assert_close(lam_near, torch.full((1,), math.exp(-eta), dtype=f64))  # -> 0 as eta grows
    # monotone: lambda decreases as alpha increases
    alphas, lams = [], []
    for t in torch.linspace(0, 1, 6, dtype=f64):
        out = lk_lambda_loss(t * near + (1 - t) * far, p, pos)
        alphas.append(out.alpha_per_position.item())
        lams.append(out.lambda_per_position.item())
    assert alphas == sorted(alphas) and lams == sorted(lams, reverse=True)


def test_lambda_is_per_position_from_mean_alpha_and_stop_gradient():
    logits, p = rand_case(n=9, seed=4)
    pos = torch.tensor([0, 1, 2] * 3)
    mask = torch.tensor([True] * 8 + [False])
    eta = 3.0
    out = lk_lambda_loss(logits, p, pos, mask, eta=eta)
    alpha, kl = per_row_terms(logits[mask], p[mask])
    pm = pos[mask]
    mean_alpha = torch.stack([alpha[pm == k].mean() for k in range(3)])
    torch.testing.assert_close(out.alpha_per_position, mean_alpha.detach())
    torch.testing.assert_close(out.lambda_per_position, torch.exp(-eta * mean_alpha.detach()))
    # stop-gradient on lambda: the loss is linear in (KL, TV) with lambda held fixed
    lam = out.lambda_per_position[pm]
    per_row = lam * kl + (1 - lam) * (1 - alpha)
    ref = sum(0.8**k * per_row[pm == k].mean() for k in range(3))
    (g,) = torch.autograd.grad(out.loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(g, g_ref)


# ---- sparse targets ----

def make_d2t(v_draft, v_target, seed=0):
    return torch.randperm(v_target, generator=torch.Generator().manual_seed(seed))[:v_draft].sort().values


@pytest.mark.parametrize("truncated", [False, True])
def test_sparse_full_k_equals_dense(truncated):
    v_t = 24
    v_d = 15 if truncated else v_t
    d2t = make_d2t(v_d, v_t) if truncated else None
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(12, v_d, generator=g, dtype=f64) * 2
    p = torch.softmax(torch.randn(12, v_t, generator=g, dtype=f64) * 2, -1)
    pos = torch.arange(12) % 3
    sparse = topk_target(p, v_t)
    a_d, kl_d = per_row_terms(logits, p, d2t=d2t)
    a_s, kl_s = per_row_terms(logits, sparse, d2t=d2t)
    torch.testing.assert_close(a_s, a_d)
    torch.testing.assert_close(kl_s, kl_d)
    for fn in LOSSES:
        out_d, g_d = grad_of(fn, logits, p, pos, d2t=d2t)
        out_s, g_s = grad_of(fn, logits, sparse, pos, d2t=d2t)
        torch.testing.assert_close(out_s.loss, out_d.loss)
        torch.testing.assert_close(out_s.alpha_per_position, out_d.alpha_per_position)
        torch.testing.assert_close(g_s, g_d)
        if fn is lk_lambda_loss:
            torch.testing.assert_close(out_s.lambda_per_position, out_d.lambda_per_position)


@pytest.mark.parametrize("truncated", [False, True])
def test_sparse_bounds(truncated):
    v_t = 64
    v_d = 40 if truncated else v_t
    d2t = make_d2t(v_d, v_t, seed=1) if truncated else None
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(32, v_d, generator=g, dtype=f64) * 2
    p = torch.softmax(torch.randn(32, v_t, generator=g, dtype=f64) * 2, -1)
    a_d, kl_d = per_row_terms(logits, p, d2t=d2t)
    for k in (1, 4, 16, 63):
        a_s, kl_s = per_row_terms(logits, topk_target(p, k), d2t=d2t)
        assert (a_s <= a_d + 1e-12).all()  # alpha: lower bound (so TV = 1 - alpha: upper bound)
        assert torch.isfinite(kl_s).all()
        if not truncated:  # coarsened KL: lower bound by data processing (with d2t only an estimate)
            assert (kl_s <= kl_d + 1e-12).all()
    # the bound is strict when the unlogged tokens overlap
    assert (per_row_terms(logits, topk_target(p, 4), d2t=d2t)[0] < a_d).all()


def coarsened_kl_reference(logits, p, k):
    """KL between p and q merged into k + 1 buckets (the top-k tokens of p, and everything else), in fp64."""
    q = torch.softmax(logits.double(), -1)
    p = p.double()
    ids = p.topk(k, -1).indices
    pc = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], -1)
    qc = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], -1)
    return (pc * (pc / qc).log()).sum(-1)


def test_sparse_kl_is_the_coarsened_kl():
    logits, p = rand_case(n=16, v=40, seed=13)
    for k in (1, 5, 20):
        _, kl = per_row_terms(logits, topk_target(p, k))
        torch.testing.assert_close(kl, coarsened_kl_reference(logits, p, k))


def test_sparse_kl_other_bucket_precise_for_confident_draft_fp32():
    # the draft puts 1 - ~1e-11 on the logged token: 1 - sum q(ids) would be 0 in fp32 (KL capped at the clamp)
    v = 1000
    logits = torch.zeros(4, v)
    logits[:, 0] = 32.0
    p = torch.softmax(torch.randn(4, v, generator=torch.Generator().manual_seed(14)), -1)
    p[:, 0] += 3.0
    p /= p.sum(-1, keepdim=True)
    _, kl = per_row_terms(logits, topk_target(p, 1))
    torch.testing.assert_close(kl.double(), coarsened_kl_reference(logits, p, 1), rtol=1e-4, atol=1e-4)


# ---- truncated draft vocabulary ----

def test_d2t_offsets_roundtrip():
    d2t = make_d2t(10, 30)
    offsets = d2t_to_offsets(d2t)
    assert torch.equal(offsets, d2t - torch.arange(10))
    assert torch.equal(d2t_from_offsets(offsets), d2t)
    ids = torch.tensor([[d2t[3], d2t[0], 29 if 29 not in d2t else 28, 1000]])
    assert target_to_draft_ids(ids, d2t)[0, :2].tolist() == [3, 0]
    assert target_to_draft_ids(ids, d2t)[0, 2:].tolist() == [-1, -1]


def test_truncated_vocab_matches_scattered_dense():
    v_t, v_d, n = 40, 25, 10
    d2t = make_d2t(v_d, v_t, seed=2)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, v_d, generator=g, dtype=f64) * 2
    p = torch.softmax(torch.randn(n, v_t, generator=g, dtype=f64) * 2, -1)
    pos = zeros(n)

    def q_full(z):  # the draft's probabilities in the target vocabulary: 0 outside the draft vocabulary
        return torch.zeros(n, v_t, dtype=f64).index_copy(1, d2t, torch.softmax(z, -1))

    def reference(z, kind):
        qf = q_full(z)
        alpha = torch.minimum(p, qf).sum(-1)
        tv = 0.5 * (p - qf).abs().sum(-1)
        if kind == "alpha":
            return -alpha.log().mean()
        if kind == "tv":
            return tv.mean()
        p_in = p[:, d2t] / p[:, d2t].sum(-1, keepdim=True)  # KL only: p renormalised over the draft vocabulary
        kl = (p_in * (p_in.log() - torch.log_softmax(z, -1))).sum(-1)
        if kind == "kl":
            return kl.mean()
        lam = torch.exp(-3.0 * alpha.mean().detach())
        return (lam * kl + (1 - lam) * tv).mean()

    for fn, kind in [(lk_alpha_loss, "alpha"), (tv_loss, "tv"), (kl_loss, "kl"), (lk_lambda_loss, "lambda")]:
        for target in (p, topk_target(p, v_t)):
            out, g_ours = grad_of(fn, logits, target, pos, d2t=d2t)
            z = logits.clone().requires_grad_()
            ref = reference(z, kind)
            (g_ref,) = torch.autograd.grad(ref, z)
            torch.testing.assert_close(out.loss, ref)
            torch.testing.assert_close(g_ours, g_ref)
    # alpha can never exceed the target mass the draft vocabulary covers: p is not renormalised for alpha
    alpha, _ = per_row_terms(logits, p, d2t=d2t)
    assert (alpha <= p[:, d2t].sum(-1) + 1e-12).all()


def test_truncated_vocab_outside_mass_contributes_nothing():
    v_t, v_d, n = 40, 25, 6
    d2t = make_d2t(v_d, v_t, seed=3)
    outside = torch.ones(v_t, dtype=torch.bool)
    outside[d2t] = False
    logits, _ = rand_case(n=n, v=v_d, seed=8)
    p = torch.softmax(torch.randn(n, v_t, dtype=f64), -1)
    out_ids = outside.nonzero()[:, 0]
    p2 = p.clone()  # move the outside mass around: all of it onto one outside token
    p2[:, outside] = 0
    p2[:, out_ids[0]] = p[:, outside].sum(-1)
    for fn in LOSSES:
        torch.testing.assert_close(fn(logits, p, zeros(n), d2t=d2t).loss, fn(logits, p2, zeros(n), d2t=d2t).loss)

    # sparse: log every draft token and 3 outside ones; move mass among the logged outside tokens (same residual)
    ids = torch.cat([d2t, out_ids[:3]]).expand(n, -1)
    p3 = p.clone()
    p3[:, out_ids[:3]] = p[:, out_ids[:3]].roll(1, dims=1)
    for fn in LOSSES:
        a, b = (SparseTarget(ids, x.gather(1, ids), 1 - x.gather(1, ids).sum(-1)) for x in (p, p3))
        torch.testing.assert_close(fn(logits, a, zeros(n), d2t=d2t).loss, fn(logits, b, zeros(n), d2t=d2t).loss)
    # alpha-only losses ignore the residual altogether (outside mass hidden in it changes nothing)
    a = topk_target(p, 5)
    b = SparseTarget(a.ids, a.probs, a.residual * 0.5)
    for fn in (lk_alpha_loss, tv_loss):
        torch.testing.assert_close(fn(logits, a, zeros(n), d2t=d2t).loss, fn(logits, b, zeros(n), d2t=d2t).loss)


# ---- masking and position weights ----

@pytest.mark.parametrize("sparse", [False, True])
def test_masked_rows_change_nothing(sparse):
    logits, p = rand_case(n=12, seed=9)
    pos = torch.arange(12) % 4
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 7, 11]] = False
    garbage_logits = logits.detach().clone()
    garbage_logits[~mask] = float("nan")
    garbage_p = p.clone()
    garbage_p[~mask] = float("inf")
    tgt = (lambda x: topk_target(x, 5)) if sparse else (lambda x: x)
    for fn in LOSSES:
        out_ref, g_ref = grad_of(fn, logits[mask], tgt(p[mask]), pos[mask], num_positions=4)
        out, g = grad_of(fn, garbage_logits, tgt(garbage_p), pos, mask)
        torch.testing.assert_close(out.loss, out_ref.loss)
        torch.testing.assert_close(out.alpha_per_position, out_ref.alpha_per_position)
        torch.testing.assert_close(g[mask], g_ref)
        assert (g[~mask] == 0).all()


def test_position_weights_are_gamma_powers():
    logits, p = rand_case(n=10, seed=10)
    pos = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    per_row = -per_row_terms(logits, p, with_kl=False)[0].log()
    for gamma in (0.8, 0.5):
        out = lk_alpha_loss(logits, p, pos, gamma=gamma)
        ref = sum(gamma ** (n - 1) * per_row[pos == n - 1].mean() for n in range(1, 5))  # n is 1-based
        torch.testing.assert_close(out.loss, ref)
    # a position with no rows adds nothing and reports NaN alpha
    out = lk_alpha_loss(logits[:5], p[:5], pos[:5], num_positions=4)
    assert torch.isnan(out.alpha_per_position[2:]).all() and torch.isfinite(out.loss)


# ---- numerics ----

def extreme_cases(v=64, n=6):
    g = torch.Generator().manual_seed(11)
    one_hot = F.one_hot(torch.randint(0, v, (n,), generator=g), v).float()
    peaked_logits = torch.zeros(n, v)
    peaked_logits[:, 0] = 1e4  # q = one-hot on token 0
    disjoint = F.one_hot(torch.full((n,), 1), v).float()  # p on token 1, q on token 0: alpha = 0
    yield "random", torch.randn(n, v, generator=g) * 3, torch.softmax(torch.randn(n, v, generator=g) * 3, -1)
    yield "one_hot_p", torch.randn(n, v, generator=g), one_hot
    yield "peaked_q", peaked_logits, torch.softmax(torch.randn(n, v, generator=g), -1)
    yield "disjoint", peaked_logits, disjoint
    yield "huge_logits", torch.randn(n, v, generator=g) * 1e3, one_hot


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["dense", "sparse", "truncated", "truncated_sparse"])
def test_extreme_inputs_finite(dtype, form):
    v_t = 96
    for name, logits, p in extreme_cases():
        d2t = None
        if form.startswith("truncated"):  # draft vocabulary = target ids 32..95, logged p on 0..63
            d2t = torch.arange(32, 96)
            p = torch.cat([p, torch.zeros(len(p), v_t - p.shape[1])], 1)
        target = topk_target(p, 8) if form.endswith("sparse") else p
        for fn in LOSSES:
            z = logits.to(dtype).requires_grad_()
            out = fn(z, target, torch.arange(len(p)) % 3, d2t=d2t)
            (g,) = torch.autograd.grad(out.loss, z)
            assert torch.isfinite(out.loss), (name, fn.__name__)
            assert torch.isfinite(g).all(), (name, fn.__name__)
            assert torch.isfinite(out.alpha_per_position).all()


def test_no_overlap_at_all_is_finite():
    # all target mass outside the draft vocabulary: alpha = 0, KL renormalisation has nothing to renormalise
    p = torch.zeros(3, 10)
    p[:, 9] = 1.0
    d2t = torch.arange(5)
    for target in (p, topk_target(p, 2)):
        for fn in LOSSES:
            z = torch.randn(3, 5, requires_grad=True)
            out = fn(z, target, zeros(3), d2t=d2t)
            (g,) = torch.autograd.grad(out.loss, z)
            assert torch.isfinite(out.loss) and torch.isfinite(g).all()
            assert out.alpha_per_position.item() == 0.0


def test_bf16_close_to_fp32():
    logits, p = rand_case(n=16, v=128, seed=12, dtype=torch.float32)
    pos = torch.arange(16) % 4
    for fn in LOSSES:
        a = fn(logits, p, pos).loss
        b = fn(logits.detach().bfloat16(), p, pos).loss
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)
