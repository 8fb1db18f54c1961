"""The worker loop against a real redis-server, on real records from the tiny target: train, gate, publish, ack,
pause, crash safety (SIGKILL of a worker subprocess), and LK vs KL on the same stream (a printed measurement)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lkserve.capture.codec import encode
from lkserve.capture.writer import FIELD
from lkserve.drafts import DraftRegistry
from lkserve.trainer.examples import build_batch, split_by_positions
from lkserve.trainer.gate import evaluate
from lkserve.trainer.replay import is_heldout
from lkserve.trainer.state import TrainingStateStore
from lkserve.trainer.train import DraftTrainer, load_draft
from lkserve.trainer.worker import Worker, WorkerConfig
from tests.test_trainer_data import make_records

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stream_records(tiny):
    return make_records(tiny.target, n_requests=160, seed=11, gen_len=32)


def _push(client, stream, records) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for r in records:
        pipe.xadd(stream, {FIELD: encode(r)})
    return [x.decode() for x in pipe.execute()]


def _cfg(tiny, redis_url, tmp_path, **kw) -> WorkerConfig:
    base = {"redis_url": redis_url, "cache_dir": str(tmp_path / "cache"), "base_draft": str(tiny.random_draft),
            "stream": "cap", "key_prefix": "w", "consumer": "w1", "train_params": "all", "batch_positions": 384,
            "min_fresh_positions": 384, "eval_every_steps": 4, "gate_min_rows": 64, "heldout_fraction": 0.2,
            "checkpoint_every_steps": 3, "block_ms": 100, "read_count": 200, "keep_ledger": True, "threads": 1}
    base.update(kw)
    return WorkerConfig(**base)


def test_worker_trains_gates_publishes_and_acks(tiny, redis_url, redis_client, tmp_path, stream_records):
    ids = _push(redis_client, "cap", stream_records)
    w = Worker(_cfg(tiny, redis_url, tmp_path, exit_when_drained=True))
    w.run()
    reg = DraftRegistry(redis_client, "w")
    assert w.counters["published"] >= 1, w.last_eval
    cur = reg.get(reg.current())
    print(f"\npublished {w.counters['published']} versions; held-out alpha {cur['heldout_alpha_before']:.3f} -> "
          f"{cur['heldout_alpha_after']:.3f} (last gate: {w.last_eval['reason']})")
    assert cur["heldout_alpha_after"] > cur["heldout_alpha_before"]
    assert Path(cur["path"]).is_dir() and cur["loss"] == "lk_lambda" and cur["records_seen"] > 0
    assert redis_client.xpending("cap", "lkserve-trainers")["pending"] == 0  # everything acked at the end
    train_ids = [i for i, r in zip(ids, stream_records) if not is_heldout(r.request_id, 0.2)]
    assert sorted(w.ledger) == sorted(train_ids)  # each train record trained exactly once (fresh)
    held = {r.request_id for r in w.replay.heldout}
    assert held and all(is_heldout(h, 0.2) for h in held)


def test_worker_pauses(tiny, redis_url, redis_client, tmp_path, stream_records):
    _push(redis_client, "cap", stream_records[:20])
    w = Worker(_cfg(tiny, redis_url, tmp_path))
    redis_client.set("w:adaptation:paused", "1")
    w.run_once()
    assert w.counters["records"] == 0 and redis_client.xlen("cap") == 20
    redis_client.set("w:adaptation:paused", "0")
    w.run_once()
    assert w.counters["records"] == 20


def test_worker_survives_sigkill(tiny, redis_url, redis_client, tmp_path, stream_records):
    """SIGKILL mid-training, restart: no acked record lost, none trained twice, training resumes."""
    ids = _push(redis_client, "cap", stream_records)
    cfg = _cfg(tiny, redis_url, tmp_path, batch_positions=256, min_fresh_positions=256, checkpoint_every_steps=2,
               eval_every_steps=1000, step_delay=0.2, exit_when_drained=True, claim_min_idle_ms=600_000)
    cfg_path = tmp_path / "worker.json"
    from dataclasses import asdict

    cfg_path.write_text(json.dumps(asdict(cfg)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LKSERVE_LOG_LEVEL="WARNING")
    store = TrainingStateStore(cfg.state_dir)
    proc = subprocess.Popen([sys.executable, "-m", "lkserve.trainer", "--config", str(cfg_path)], env=env,
                            cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = store.load() if store.path.exists() else None
            if st is not None and st["trainer"]["step"] >= 4:
                break
            assert proc.poll() is None, "worker exited early"
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint with >= 4 steps")
        time.sleep(0.3)  # somewhere inside the next steps: trained, not yet checkpointed
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = store.load()
    pending = {e["message_id"].decode() for e in redis_client.xpending_range("cap", "lkserve-trainers", "-", "+", 10_000)}
    delivered_acked = [i for i in ids if i not in pending]
    held_ids = {i for i, r in zip(ids, stream_records) if is_heldout(r.request_id, 0.2)}
    in_ckpt = set(at_kill["ledger"]) | held_ids
    # acked only after a durable checkpoint included them
    assert set(delivered_acked) <= in_ckpt
    step_at_kill = at_kill["trainer"]["step"]
    print(f"\nkilled at checkpoint step {step_at_kill}: {len(delivered_acked)} acked, {len(pending)} pending, "
          f"{len(at_kill['ledger'])} in the checkpoint's ledger")
    assert pending, "the kill should leave unacked records"

    proc2 = subprocess.run([sys.executable, "-m", "lkserve.trainer", "--config", str(cfg_path)], env=env,
                           cwd=str(ROOT), timeout=240, capture_output=True, text=True, check=False)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    final = store.load()
    ledger = final["ledger"]
    assert ledger[: len(at_kill["ledger"])] == at_kill["ledger"]  # resumed from the checkpoint
    assert final["trainer"]["step"] > step_at_kill
    dup = [k for k, v in Counter(ledger).items() if v > 1]
    assert not dup, f"trained twice: {dup[:5]}"
    train_ids = [i for i, r in zip(ids, stream_records) if not is_heldout(r.request_id, 0.2)]
    assert sorted(ledger) == sorted(train_ids)  # nothing lost
    assert redis_client.xpending("cap", "lkserve-trainers")["pending"] == 0


def test_lk_vs_kl_same_stream(tiny):
    """A measurement, not an assertion: held-out alpha after the same budget with LK-lambda, LK-alpha and KL."""
    recs = make_records(tiny.target, n_requests=200, seed=21, gen_len=32)
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
        out[loss] = (res.alpha_mean, res.tau)
    print(f"\nLK vs KL (tiny, T=1, {sum(r.num_positions for r in train)} train positions, 1 epoch, "
          f"{sum(r.num_positions for r in held)} held-out): start alpha {start:.4f}; " +
          "; ".join(f"{k}: alpha {a:.4f} tau {t:.4f}" for k, (a, t) in out.items()))
