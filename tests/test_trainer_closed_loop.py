"""Closed loop on the tiny models through the real vLLM engine: capture -> Redis -> worker -> publish -> hot swap,
and automatic rollback of a broken version.

The engine is the session's `spec_engine` (tiny target + random draft, K=4, probabilistic, T=1 here); its capture
records go to the Redis stream through `RedisStreamWriter`, the writer of the engine's Redis sink; the worker's
announcements reach the engine through the gateway's own subscriber (a `DraftManager` on Redis pub/sub).
Acceptance is vLLM's own per-request spec-decode metrics.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from lkserve.config import EngineSettings, RedisSettings, Settings, TrainerSettings
from lkserve.drafts import DraftRegistry
from lkserve.trainer.publish import publish
from lkserve.trainer.train import load_draft
from lkserve.trainer.worker import Worker
from tests.conftest import write_records

ROUNDS = 10
torch.set_num_threads(1)


def _settings(tiny, redis_url, tmp_path, prefix, **trainer) -> Settings:
    knobs = {"base_version": "random", "train_params": "all", "block_ms": 50, "read_count": 500, "threads": 1,
             "metrics_port": None}
    return Settings(cache_dir=tmp_path / "cache", redis=RedisSettings(url=redis_url, stream="cap", key_prefix=prefix),
                    engine=EngineSettings(draft_model=str(tiny.random_draft)),
                    trainer=TrainerSettings(**{**knobs, **trainer}))


def _prompts(engine_handle, n, rng, length=12):
    from lkserve.models.tiny import _corpus_text

    ids = engine_handle.engine.tokenizer(_corpus_text(100_000))["input_ids"]
    starts = rng.integers(0, len(ids) - length, n)
    return [list(ids[s : s + length]) for s in starts]


def _traffic(h, rng, n=16, max_tokens=40):
    """One round of requests at T=1, each seeded from rng; returns (per-position acceptance [K], accepted/drafted,
    records)."""
    from vllm import SamplingParams

    prompts = _prompts(h, n, rng)
    seeds = rng.integers(0, 2**31, n)
    res = h.generate_many([(p, SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=int(s)))
                           for p, s in zip(prompts, seeds)])
    dr = np.sum([r.spec.per_position_drafted for r in res], 0)
    ac = np.sum([r.spec.per_position_accepted for r in res], 0)
    rate = sum(r.spec.accepted for r in res) / max(1, sum(r.spec.drafted for r in res))
    return ac / np.maximum(dr, 1), rate, h.drain()


def test_closed_loop_acceptance_rises(spec_engine, tiny, redis_url, redis_client, tmp_path, draft_subscriber,
                                      capture_writer):
    h = spec_engine
    h.use_draft("random")
    assert h.run(h.engine.set_spec_k(None))["ok"]  # the configured K, whatever an earlier test left (a swap keeps K)
    h.drain()
    subscriber, writer = draft_subscriber(h, "cl"), capture_writer("cap")
    rng = np.random.default_rng(0)
    w = Worker(_settings(tiny, redis_url, tmp_path, "cl", consumer="cl1", lr=1e-2, batch_positions=256,
                         min_fresh_positions=256, replay_ratio=0.5, eval_every_steps=2, gate_min_rows=64,
                         gate_margin=0.002, heldout_fraction=0.2, checkpoint_every_steps=4))
    reg = DraftRegistry(redis_client, "cl")
    # the random draft's rate: the mean of 3 rounds, as the end rate is (at K=4 it measured 0.031 in each round)
    log, records_in = [], 0
    for _ in range(3):
        pos, rate, recs = _traffic(h, rng)
        records_in += len(recs)
        write_records(writer, recs)
        log.append((0, "random", round(rate, 4), pos.round(3).tolist(), None))
    start_rate = np.mean([r[2] for r in log])
    for rnd in range(1, ROUNDS + 1):
        for _ in range(4):
            w.run_once()
        swapped = subscriber.follow(reg)
        pos, rate, recs = _traffic(h, rng)
        records_in += len(recs)
        write_records(writer, recs)
        log.append((rnd, h.engine.draft_version, round(rate, 4), pos.round(3).tolist(), swapped))
    print("\nround, serving version, vLLM acceptance, per-position acceptance, swapped-in")
    for row in log:
        print(*row)
    end_rate = np.mean([r[2] for r in log[-3:]])
    print(f"acceptance {start_rate:.3f} -> {end_rate:.3f} (mean of last 3 rounds) after {records_in} records, "
          f"{w.trainer.step_count} steps, {w.counters['published']} versions published; last gate: {w.last_eval}")
    h.use_draft("random")
    assert w.counters["published"] >= 1
    # stated margin: acceptance at least x1.5 and +0.025 absolute, both means of 3 rounds (measured: 0.031 -> 0.075
    # and 0.031 -> 0.088 over 10 rounds, single rounds after the first swaps 0.053-0.086; the tiny random target is
    # barely learnable beyond its marginal, see docs/worker.md)
    assert end_rate >= 1.5 * start_rate and end_rate >= start_rate + 0.025


def test_automatic_rollback_of_a_broken_version(spec_engine, tiny, redis_url, redis_client, tmp_path,
                                                draft_subscriber, capture_writer):
    """A broken draft (random weights, head scaled x10) published past the gate by a test hook: live acceptance
    collapses against the previous version's and the worker announces the previous version within the window."""
    h = spec_engine
    h.use_draft("random")
    h.drain()
    subscriber, writer = draft_subscriber(h, "rb"), capture_writer("cap")
    rng = np.random.default_rng(1)
    w = Worker(_settings(tiny, redis_url, tmp_path, "rb", consumer="rb1", batch_positions=100_000,
                         min_fresh_positions=100_000, rollback_window_tokens=400, rollback_margin=0.015))
    # training effectively off: this test is about the monitor
    reg = DraftRegistry(redis_client, "rb")
    _, base_rate, recs = _traffic(h, rng)
    write_records(writer, recs)
    w.run_once()
    broken = load_draft(tiny.random_draft)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in broken.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        broken.lm_head.weight.mul_(10)
    meta = publish(reg, broken, tiny.random_draft, w.cache_dir, metadata={"test_hook": "broken"})
    assert subscriber.follow(reg) == meta["version"]
    rolled_after, tokens = None, 0
    for rnd in range(1, 7):
        _, rate, recs = _traffic(h, rng)
        tokens += sum(r.num_positions for r in recs)
        write_records(writer, recs)
        print(f"\nbroken {h.engine.draft_version}: acceptance {rate:.3f} (previous 'random': {base_rate:.3f})")
        w.run_once()
        if reg.current() != meta["version"]:
            rolled_after = rnd
            break
    assert rolled_after is not None, "the worker did not roll back"
    print(f"rolled back after {rolled_after} rounds ({tokens} verified tokens of the broken version)")
    assert reg.current() == "random" and reg.get(meta["version"])["status"] == "rolled_back"
    assert w.counters["rolled_back"] == 1
    ann = json.loads(reg.client.get("rb:drafts:latest"))
    assert ann["version"] == "random"
    assert subscriber.follow(reg) == "random"  # the subscriber swapped the engine back
    h.use_draft("random")
