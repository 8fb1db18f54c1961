"""The worker loop against a real redis-server, on real records from the tiny target: train, gate, publish, ack,
pause, crash safety (SIGKILL of a worker subprocess). (LK vs KL on such a stream: bench/lk_vs_kl_tiny.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from lkserve.capture.codec import encode
from lkserve.capture.writer import FIELD
from lkserve.config import EngineSettings, RedisSettings, Settings, TrainerSettings
from lkserve.drafts import DraftRegistry
from lkserve.trainer.replay import is_heldout
from lkserve.trainer.state import TrainingStateStore
from lkserve.trainer.worker import Worker
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


def _settings(tiny, redis_url, tmp_path, **trainer) -> Settings:
    knobs = {"consumer": "w1", "train_params": "all", "batch_positions": 384, "min_fresh_positions": 384,
             "eval_every_steps": 4, "gate_min_rows": 64, "heldout_fraction": 0.2, "checkpoint_every_steps": 3,
             "block_ms": 100, "read_count": 200, "keep_ledger": True, "threads": 1, "metrics_port": None}
    return Settings(cache_dir=tmp_path / "cache", redis=RedisSettings(url=redis_url, stream="cap", key_prefix="w"),
                    engine=EngineSettings(draft_model=str(tiny.random_draft)),
                    trainer=TrainerSettings(**{**knobs, **trainer}))


def test_worker_trains_gates_publishes_and_acks(tiny, redis_url, redis_client, tmp_path, stream_records):
    ids = _push(redis_client, "cap", stream_records)
    w = Worker(_settings(tiny, redis_url, tmp_path, exit_when_drained=True, metrics_port=0))
    w.run()
    with pytest.raises(httpx.ConnectError):  # the HTTP port closes with the loop
        httpx.get(f"http://127.0.0.1:{w.http.port}/metrics")
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


def test_worker_teacher_forcing_labels_every_position(tiny, redis_url, redis_client, tmp_path, stream_records):
    """trainer.teacher_forcing: each record the worker takes in is relabelled by the target at every position of its
    context (same request id, so the same side of the split; same draft version), and the labels agree with the
    target's own distributions where the served record had them."""
    import numpy as np

    served = stream_records[:24]
    _push(redis_client, "cap", served)
    settings = _settings(tiny, redis_url, tmp_path, teacher_forcing=True, min_fresh_positions=10**6)
    w = Worker(settings.model_copy(update={"engine": settings.engine.model_copy(
        update={"target_model": str(tiny.target)})}))
    w.run_once()
    assert w.counters["records"] == 24 and w.counters["teacher_forced_records"] == 24
    got = [i.record for i in w.replay.fresh] + list(w.replay.heldout)
    by_id = {r.request_id: r for r in served}
    assert sorted(r.request_id for r in got) == sorted(by_id)
    for r in got:
        orig = by_id[r.request_id]
        assert r.draft_version == orig.draft_version and r.tags.get("source") == "teacher"
        assert r.num_positions == len(orig.context_token_ids) - 1 > orig.num_positions
        where = {int(p): j for j, p in enumerate(r.positions)}
        for j, p in enumerate(orig.positions):  # the served labels, found again among the teacher's
            t = where[int(p)]
            assert np.array_equal(r.topk_ids[t][:4], orig.topk_ids[j][:4])
            assert np.allclose(r.topk_probs[t].astype(float), orig.topk_probs[j].astype(float), atol=2e-3)


def test_worker_pauses(tiny, redis_url, redis_client, tmp_path, stream_records):
    _push(redis_client, "cap", stream_records[:20])
    w = Worker(_settings(tiny, redis_url, tmp_path))
    redis_client.set("w:adaptation:paused", "1")
    w.run_once()
    assert w.counters["records"] == 0 and redis_client.xlen("cap") == 20
    redis_client.set("w:adaptation:paused", "0")
    w.run_once()
    assert w.counters["records"] == 20


def test_worker_survives_sigkill(tiny, redis_url, redis_client, tmp_path, stream_records):
    """SIGKILL mid-training, restart: no acked record lost, none trained twice, training resumes."""
    ids = _push(redis_client, "cap", stream_records)
    settings = _settings(tiny, redis_url, tmp_path, batch_positions=256, min_fresh_positions=256,
                         checkpoint_every_steps=2, eval_every_steps=1000, step_delay=0.2, exit_when_drained=True,
                         claim_min_idle_ms=600_000)
    cfg_path = tmp_path / "worker.json"
    cfg_path.write_text(settings.model_dump_json())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LKSERVE_LOG_LEVEL="WARNING")
    store = TrainingStateStore(settings.cache_dir / "worker" / "w1")
    proc = subprocess.Popen([sys.executable, "-m", "lkserve.trainer", "--settings", str(cfg_path)], env=env,
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

    proc2 = subprocess.run([sys.executable, "-m", "lkserve.trainer", "--settings", str(cfg_path)], env=env,
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
