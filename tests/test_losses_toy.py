"""The paper's toy: fit ONE Gaussian q to a 3-mode mixture p and compare the overlap alpha = sum min(p, q).

The grid is the vocabulary: q's logits are its log-density on the grid, p is the mixture discretised on it, and
the fits use our own loss functions. KL's mode-covering (forward) or mode-seeking (reverse) compromise leaves
acceptance on the table; TV / LK-alpha maximise it directly. Reference (issue author: fp64, 24001 points on
[-30, 30], 4000 Adam steps, lr 0.05): forward KL 51.1%, reverse KL 50.7%, TV = LK-alpha 59.8%, LK-lambda
51.4 / 52.3 / 59.7 / 59.8% for eta = 1 / 3 / 10 / 30. 3001 points and 800 steps reproduce these to ~0.02 point
(measured) at a fraction of the cost.
"""

import itertools
import math

import pytest
import torch

from lkserve.losses import acceptance, kl_loss, lk_alpha_loss, lk_lambda_loss, tv_loss

GRID, STEPS, LR = 3001, 800, 0.05
ETAS = (1.0, 3.0, 10.0, 30.0)


def mixture_log_density(x):
    comps = [math.log(w) - 0.5 * (x - m) ** 2 for w, m in [(0.5, 0.0), (0.25, 5.0), (0.25, -10.0)]]
    return torch.logsumexp(torch.stack(comps), 0)


def gaussian_logits(x, theta):  # theta = (mu, log sigma); log_softmax normalises on the grid
    return (-0.5 * ((x - theta[0]) / theta[1].exp()) ** 2 - theta[1])[None]  # [1, G]


def reverse_kl(logits, p):  # KL(q || p): not a direction our losses offer, so a local helper
    log_q = torch.log_softmax(logits, -1)
    return (log_q.exp() * (log_q - p.log())).sum()


def fit(loss_fn, x, p, mu0, log_sigma0):
    theta = torch.tensor([mu0, log_sigma0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=LR)
    for _ in range(STEPS):
        loss = loss_fn(gaussian_logits(x, theta))
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = torch.softmax(gaussian_logits(x, theta.detach()), -1)
    return 100 * acceptance(p, q).item()  # overlap in %


@pytest.fixture(scope="module")
def overlaps():
    x = torch.linspace(-30, 30, GRID, dtype=torch.float64)
    p = torch.softmax(mixture_log_density(x), 0)[None]  # [1, G]
    pos = torch.zeros(1, dtype=torch.long)
    ours = {
        "kl": lambda z: kl_loss(z, p, pos).loss,
        "tv": lambda z: tv_loss(z, p, pos).loss,
        "lk_alpha": lambda z: lk_alpha_loss(z, p, pos).loss,
    }
    return {
        "forward_kl": fit(ours["kl"], x, p, 0.0, 0.0),
        "reverse_kl": fit(lambda z: reverse_kl(z, p), x, p, 0.5, 0.0),  # start near the dominant mode
        "tv": [fit(ours["tv"], x, p, *start) for start in [(0.0, 0.0), (-2.0, 1.5)]],
        "lk_alpha": [fit(ours["lk_alpha"], x, p, *start) for start in [(0.0, 0.0), (2.0, 1.0)]],
        "lk_lambda": [fit(lambda z, eta=eta: lk_lambda_loss(z, p, pos, eta=eta).loss, x, p, 0.0, 0.0)
                      for eta in ETAS],
    }


def test_toy_tv_and_lk_alpha_beat_kl(overlaps):
    best_kl = max(overlaps["forward_kl"], overlaps["reverse_kl"])
    for name in ("tv", "lk_alpha"):
        for overlap in overlaps[name]:
            assert overlap >= best_kl + 7, (name, overlap, overlaps)


def test_toy_lk_lambda_moves_from_kl_to_tv_as_eta_grows(overlaps):
    lam = overlaps["lk_lambda"]
    for lo, hi in itertools.pairwise(lam):
        assert hi >= lo - 0.5, overlaps
    assert abs(lam[-1] - max(overlaps["tv"])) <= 1.0, overlaps


def test_toy_matches_reference_numbers(overlaps):
    ref = {"forward_kl": 51.1, "reverse_kl": 50.7, "tv": 59.8, "lk_alpha": 59.8}
    for name, value in ref.items():
        got = overlaps[name] if isinstance(overlaps[name], float) else min(overlaps[name])
        assert abs(got - value) <= 1.0, (name, got)
    for got, value in zip(overlaps["lk_lambda"], (51.4, 52.3, 59.7, 59.8)):
        assert abs(got - value) <= 1.0, overlaps
