"""Held-out alpha after the same budget with LK-lambda, LK-alpha and KL on one stream of tiny-model records.

    python bench/lk_vs_kl_tiny.py [--requests 200] [--seed 21] [--out DIR]

Records come from the tiny random target at T=1 (tests.test_trainer_data.make_records, the worker tests' stream);
each loss trains a fresh copy of the tiny random draft (all parameters, lr 3e-3) for one epoch in 384-position
batches. Prints ONE JSON line: start alpha, and per loss the held-out alpha and tau. A measurement: on a random
target the losses are close, so nothing is asserted (the SmolLM2 comparison is bench/adaptation.py).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the record generator lives with the tests

from lkserve.models.tiny import tiny_models
from lkserve.trainer.examples import build_batch, split_by_positions
from lkserve.trainer.gate import evaluate
from lkserve.trainer.replay import is_heldout
from lkserve.trainer.train import DraftTrainer, load_draft
from tests.test_trainer_data import make_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", help="where the tiny models go (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_models(Path(args.out or tmp))
        recs = make_records(tiny.target, n_requests=args.requests, seed=args.seed, gen_len=32)
        train = [r for r in recs if not is_heldout(r.request_id, 0.2)]
        held = [r for r in recs if is_heldout(r.request_id, 0.2)]
        start = evaluate(load_draft(tiny.random_draft), held).alpha_mean
        out = {}
        for loss in ("lk_lambda", "lk_alpha", "kl"):
            torch.manual_seed(0)
            tr = DraftTrainer(tiny.random_draft, loss=loss, train_params="all", lr=3e-3)
            for g in split_by_positions(train, 384):
                tr.step(build_batch(g))
            res = evaluate(tr.model, held)
            out[loss] = {"alpha": round(res.alpha_mean, 4), "tau": round(res.tau, 4)}
    print(json.dumps({"train_positions": sum(r.num_positions for r in train),
                      "heldout_positions": sum(r.num_positions for r in held), "epochs": 1,
                      "start_alpha": round(start, 4), "losses": out}))


if __name__ == "__main__":
    main()
