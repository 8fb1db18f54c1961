"""The adaptation worker: consume capture records -> replay -> train -> evaluate -> gate -> publish -> watch rollback.

One loop, one thread (the engine owns the rest of the CPU):

    read (own pending after a restart, then XREADGROUP + XAUTOCLAIM)  ->  split train / held-out by request id
    -> every `batch_positions` fresh positions: one optimizer step (fresh + `replay_ratio` reservoir)
    -> every `eval_every_steps` steps: held-out alpha of candidate vs serving (same records); publish if it wins
    -> every `checkpoint_every_steps` steps / `checkpoint_every_seconds`: durable training state, THEN ack
    -> on every batch of records: live acceptance per draft_version; roll back a version that fell behind its
       predecessor by `rollback_margin` over `rollback_window_tokens` verified positions.

While `<prefix>:adaptation:paused` is "1" nothing is read or trained (records wait in the stream).
Logs are one JSON object per line on the `lkserve.worker` logger; metrics are `lkserve_worker_*`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from lkserve.capture.reader import StreamReader
from lkserve.drafts import DraftRegistry
from lkserve.metrics.worker import (
    M_ACKED,
    M_ALPHA,
    M_CKPT,
    M_HELD_ALPHA,
    M_HELD_ALPHA_POS,
    M_HELD_TAU,
    M_LAMBDA,
    M_LAST_STEP,
    M_LIVE,
    M_LOSS,
    M_PAUSED,
    M_POSITIONS,
    M_PUBLISHED,
    M_RECORDS,
    M_REJECTED,
    M_ROLLED_BACK,
    M_RPS,
    M_STEPS,
    observe_stream,
)
from lkserve.trainer.drafts import ops_for
from lkserve.trainer.gate import Gate
from lkserve.trainer.publish import clean_partial, publish, register_base
from lkserve.trainer.replay import ReplayBuffer
from lkserve.trainer.rollback import RollbackMonitor, manual_rollback
from lkserve.trainer.state import AckTracker, TrainingStateStore, read_own_pending
from lkserve.trainer.train import set_threads

log = logging.getLogger("lkserve.worker")

def _event(event: str, **fields) -> None:
    log.info(json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str))


@dataclass
class WorkerConfig:
    redis_url: str
    cache_dir: str
    base_draft: str  # checkpoint dir the engines start with (a draft model, or an EAGLE-3 head)
    base_version: str = "base"
    method: str = "draft_model"  # what base_draft is: "draft_model" or "eagle3" (as EngineSettings.method)
    target_model: str | None = None  # the target's checkpoint dir; eagle3 needs it (the head shares its embedding)
    stream: str = "lkserve:capture"
    key_prefix: str = "lkserve"
    group: str = "lkserve-trainers"
    consumer: str | None = None  # stable across restarts (own pending entries are found by name)
    # training (TrainerSettings)
    loss: str = "lk_lambda"
    eta: float = 3.0
    gamma: float = 0.8
    lr: float = 3e-3
    batch_positions: int = 1024
    grad_clip: float = 1.0
    threads: int = 1
    # training (worker-only knobs)
    train_params: str = "layers"  # draft models only (an EAGLE-3 head trains all of its own weights)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 100_000
    num_positions: int = 4  # K
    max_context: int = 2048
    min_fresh_positions: int | None = None  # default batch_positions // 2
    # replay / held-out
    heldout_fraction: float = 0.1
    heldout_records: int = 256
    reservoir_records: int = 2048
    replay_ratio: float = 0.25
    # gate / publish
    eval_every_steps: int = 20
    gate_margin: float = 0.005
    gate_metric: str = "alpha_mean"
    gate_min_rows: int = 256
    # crash safety
    checkpoint_every_steps: int = 10
    checkpoint_every_seconds: float = 30.0
    claim_min_idle_ms: int = 60_000
    keep_ledger: bool = False  # keep every trained entry id in the state (tests, audits)
    # rollback
    rollback_window_tokens: int = 2000
    rollback_margin: float = 0.05
    # plumbing
    read_count: int = 64
    block_ms: int = 500
    metrics_port: int | None = None  # HTTP: /metrics and the registered checkpoints (lkserve.trainer.http)
    public_url: str | None = None  # how gateways reach that port, e.g. http://worker:9100 (None: shared disk only)
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps (tests)
    step_delay: float = 0.0  # test hook: sleep after each step (makes a crash window easy to hit)
    exit_when_drained: bool = False  # stop once the stream has nothing new (tests, batch jobs)
    state_dir: str | None = None  # default <cache>/worker/<consumer>

    def __post_init__(self):
        self.consumer = self.consumer or f"{socket.gethostname()}-worker"
        if self.min_fresh_positions is None:
            self.min_fresh_positions = max(1, self.batch_positions // 2)
        if self.state_dir is None:
            self.state_dir = str(Path(self.cache_dir) / "worker" / self.consumer)


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        set_threads(cfg.threads)
        self.ops = ops_for(cfg)
        self.client = redis.Redis.from_url(cfg.redis_url)
        self.registry = DraftRegistry(self.client, cfg.key_prefix, public_url=cfg.public_url)
        self.reader = StreamReader(cfg.redis_url, cfg.stream, cfg.group, cfg.consumer,
                                   claim_min_idle_ms=cfg.claim_min_idle_ms)
        self.store = TrainingStateStore(cfg.state_dir)
        self.tracker = AckTracker()
        self.replay = ReplayBuffer(cfg.heldout_fraction, cfg.heldout_records, cfg.reservoir_records,
                                   cfg.replay_ratio, cfg.seed)
        self.gate = Gate(cfg.gate_margin, cfg.gate_metric, cfg.gate_min_rows, evaluate=self.ops.evaluate)
        self.monitor = RollbackMonitor(cfg.rollback_window_tokens, cfg.rollback_margin)
        self.ledger: list[str] = []
        self.counters = {"records": 0, "heldout_records": 0, "positions_trained": 0, "published": 0,
                         "rejected": 0, "rolled_back": 0, "records_without_hidden_states": 0}
        self.last_eval: dict = {}
        self.stopping = False
        self._steps_since_eval = 0
        self._steps_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._rate_t0, self._rate_n = time.monotonic(), 0
        self._setup()

    # -- setup / restore --------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        removed = clean_partial(cfg.cache_dir)
        register_base(self.registry, cfg.base_draft, cfg.base_version)
        state = self.store.load()
        start_dir = cfg.base_draft
        if state is None:  # no training state: continue from whatever serves now
            cur = self.registry.get(self.registry.current() or cfg.base_version)
            start_dir = cur["path"] if cur else cfg.base_draft
        self.trainer = self.ops.trainer(start_dir)
        restored = 0
        if state is not None:
            self.trainer.load_state_dict(state["trainer"])
            self.replay.load_state(state["replay"])
            self.ledger = list(state.get("ledger", []))
            self.counters.update(state.get("counters", {}))
            included = list(state.get("included_ids", []))
            self.tracker.skip = set(included)
            if included:
                self.reader.ack(included)  # a crash may have hit between the checkpoint and its ack
            restored = len(included)
        self.serving_version = None
        self._load_serving()
        pending = read_own_pending(self.client, cfg.stream, cfg.group, cfg.consumer)
        self._intake(pending)
        _event("worker_start", consumer=cfg.consumer, restored_checkpoint=state is not None,
               step=self.trainer.step_count, own_pending=len(pending), acked_from_checkpoint=restored,
               removed_partial_dirs=removed, serving=self.serving_version, loss=cfg.loss, method=cfg.method)

    def _load_serving(self) -> None:
        version = self.registry.current() or self.cfg.base_version
        if version == self.serving_version:
            return
        meta = self.registry.get(version)
        self.serving_model = self.ops.load(meta["path"]) if meta else self.ops.copy(self.trainer.model)
        self.serving_version = version

    # -- loop -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.cfg.metrics_port:
            from lkserve.trainer.http import serve_worker_http

            serve_worker_http(self.cfg.metrics_port, self.registry.get)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self.stop())
            except ValueError:  # not the main thread
                pass
        try:
            while not self.stopping:
                self.run_once()
                if self.cfg.max_steps is not None and self.trainer.step_count >= self.cfg.max_steps:
                    break
        finally:
            self.checkpoint(force=True)
            _event("worker_stop", step=self.trainer.step_count, **self.counters)

    def stop(self) -> None:
        self.stopping = True

    def run_once(self) -> None:
        if self.registry.is_paused():
            M_PAUSED.set(1)
            time.sleep(min(1.0, self.cfg.block_ms / 1000))
            return
        M_PAUSED.set(0)
        entries = self.reader.read(self.cfg.read_count, self.cfg.block_ms)
        self._intake(entries)
        if not entries and self.cfg.exit_when_drained:
            while self.replay.fresh:
                self.train_step()  # the remainder, smaller than min_fresh_positions
            self.stop()
            return
        while self.replay.fresh_positions >= self.cfg.min_fresh_positions and not self.stopping:
            self.train_step()
            if self.cfg.max_steps is not None and self.trainer.step_count >= self.cfg.max_steps:
                break
            if self.registry.is_paused():
                break
        self.check_rollback()
        if self.tracker.absorbed and time.monotonic() - self._last_ckpt >= self.cfg.checkpoint_every_seconds:
            self.checkpoint()

    def _intake(self, entries) -> None:
        n = 0
        for eid, rec in entries:
            if eid in self.tracker.skip:
                self.reader.ack([eid])
                self.tracker.skip.discard(eid)
                continue
            if self.tracker.seen(eid):
                continue
            self.tracker.hold(eid)
            self.monitor.observe(rec)
            if self.cfg.method == "eagle3" and rec.num_positions and rec.hidden_states is None:
                self.counters["records_without_hidden_states"] += 1
                if self.counters["records_without_hidden_states"] == 1:
                    _event("warning", message="EAGLE-3 training needs records with the target's hidden states: "
                                              "set LKSERVE_CAPTURE__HIDDEN_STATES=true on the gateways")
            side = self.replay.add(eid, rec)
            M_RECORDS.labels(side).inc()
            self.counters["records"] += 1
            if side == "heldout" or rec.num_positions == 0:
                self.counters["heldout_records"] += side == "heldout"
                self.tracker.absorb([eid])  # its effect is the saved held-out set (or nothing)
            n += 1
        self._rate_n += n
        dt = time.monotonic() - self._rate_t0
        if dt >= 10:
            M_RPS.set(self._rate_n / dt)
            self._rate_t0, self._rate_n = time.monotonic(), 0
            observe_stream(self.client, self.cfg.stream, self.cfg.group)

    def train_step(self) -> None:
        fresh, replayed = self.replay.next_batch(self.cfg.batch_positions)
        records = [i.record for i in fresh] + replayed
        try:
            batch = self.ops.batch(records)
        except ValueError:  # nothing usable (e.g. only position-0 rows, or no hidden states for a head)
            self.tracker.absorb([i.entry_id for i in fresh])
            return
        res = self.trainer.step(batch)
        ids = [i.entry_id for i in fresh if i.entry_id is not None]
        self.tracker.absorb(ids)
        if self.cfg.keep_ledger:
            self.ledger.extend(ids)
        n_fresh = sum(i.positions for i in fresh)
        self.counters["positions_trained"] += n_fresh
        M_STEPS.inc()
        M_LAST_STEP.set_to_current_time()
        M_POSITIONS.inc(n_fresh)
        M_LOSS.set(res.loss)
        for n, a in enumerate(res.alpha_per_position):
            if a is not None:
                M_ALPHA.labels(str(n)).set(a)
        for n, lam in enumerate(res.lambda_per_position or []):
            if lam is not None:
                M_LAMBDA.labels(str(n)).set(lam)
        _event("step", step=res.step, loss=round(res.loss, 5), rows=res.rows, fresh_positions=n_fresh,
               alpha=[None if a is None else round(a, 4) for a in res.alpha_per_position],
               seconds=round(res.seconds, 3))
        self._steps_since_eval += 1
        self._steps_since_ckpt += 1
        if self.cfg.step_delay:
            time.sleep(self.cfg.step_delay)
        if self._steps_since_eval >= self.cfg.eval_every_steps:
            self.evaluate_and_publish()
        if self._steps_since_ckpt >= self.cfg.checkpoint_every_steps:
            self.checkpoint()

    # -- gate + publish ---------------------------------------------------------------------------------------
    def evaluate_and_publish(self) -> dict | None:
        self._steps_since_eval = 0
        self._load_serving()
        held = list(self.replay.heldout)
        if not held:
            return None
        d = self.gate.decide(self.trainer.model, self.serving_model, held)
        for role, res in (("candidate", d.candidate), ("serving", d.serving)):
            M_HELD_ALPHA.labels(role).set(res.alpha_mean)
            M_HELD_TAU.labels(role).set(res.tau)
            for n, a in enumerate(res.alpha_per_position):
                if not math.isnan(a):
                    M_HELD_ALPHA_POS.labels(role, str(n)).set(a)
        self.last_eval = {"candidate": d.candidate.as_dict(), "serving": d.serving.as_dict(),
                          "serving_version": self.serving_version, "publish": d.publish, "reason": d.reason}
        _event("gate", step=self.trainer.step_count, publish=d.publish, reason=d.reason,
               candidate_alpha=round(d.candidate.alpha_mean, 4), serving_alpha=round(d.serving.alpha_mean, 4),
               candidate_tau=round(d.candidate.tau, 4), serving_tau=round(d.serving.tau, 4),
               heldout_rows=d.candidate.rows, serving=self.serving_version)
        if not d.publish:
            if d.candidate.rows >= self.gate.min_rows:
                self.counters["rejected"] += 1
                M_REJECTED.inc()
            return None
        meta = publish(self.registry, self.trainer.model, self.cfg.base_draft, self.cfg.cache_dir,
                       save=self.ops.save, metadata={
            "method": self.cfg.method, "loss": self.cfg.loss, "eta": self.cfg.eta, "step": self.trainer.step_count,
            "records_seen": self.counters["records"], "positions_trained": self.counters["positions_trained"],
            "heldout_alpha_before": d.serving.alpha_mean, "heldout_alpha_after": d.candidate.alpha_mean,
            "heldout_tau_before": d.serving.tau, "heldout_tau_after": d.candidate.tau,
            "heldout_rows": d.candidate.rows, "parent": self.serving_version,
            "train_params": self.cfg.train_params,
        })
        self.serving_model = self.ops.copy(self.trainer.model)
        self.serving_version = meta["version"]
        self.counters["published"] += 1
        M_PUBLISHED.inc()
        _event("published", version=meta["version"], path=meta["path"], sha256=meta["sha256"])
        return meta

    # -- rollback ---------------------------------------------------------------------------------------------
    def check_rollback(self):
        cur, prev = self.registry.current(), self.registry.previous()
        M_LIVE.labels("current").set(self.monitor.rate(cur) if cur else float("nan"))
        M_LIVE.labels("previous").set(self.monitor.rate(prev) if prev else float("nan"))
        d = self.monitor.check(cur, prev)
        if d is None or not d.rollback:
            return d
        manual_rollback(self.registry, to=prev, reason=f"automatic: {d.reason}")
        self.counters["rolled_back"] += 1
        M_ROLLED_BACK.inc()
        _event("rolled_back", version=cur, to=prev, reason=d.reason)
        self._load_serving()
        return d

    # -- crash safety -----------------------------------------------------------------------------------------
    def checkpoint(self, force: bool = False) -> None:
        if not force and not self.tracker.absorbed and not self.tracker.unacked:
            return
        included = self.tracker.to_checkpoint()
        state = {"trainer": self.trainer.state_dict(), "replay": self.replay.state(), "included_ids": included,
                 "ledger": self.ledger, "counters": dict(self.counters), "config": asdict(self.cfg),
                 "saved_at": time.time()}
        seconds = self.store.save(state)
        self.tracker.checkpointed()
        acked = self.tracker.ack(self.reader)
        M_CKPT.inc()
        M_ACKED.inc(acked)
        self._steps_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        _event("checkpoint", step=self.trainer.step_count, included=len(included), acked=acked,
               seconds=round(seconds, 3))


def config_from_settings(settings, **overrides) -> WorkerConfig:
    """WorkerConfig from lkserve Settings (Redis URL resolved by the caller or an embedded server started)."""
    from lkserve.capture.embedded_redis import resolve_redis_url

    url = overrides.pop("redis_url", None)
    if url is None:
        url, handle = resolve_redis_url(settings)
        overrides["_redis_handle"] = handle
    method = overrides.pop("method", None) or settings.engine.method
    base = overrides.pop("base_draft", None) or settings.engine.draft_model
    target = overrides.pop("target_model", None) or settings.engine.target_model
    if base is None or (target is None and method == "eagle3"):  # a draft model trains without its target
        from lkserve.models.prepare import prepare_default_models

        default_target, default_draft = prepare_default_models(settings.cache_dir, method=method)
        base, target = base or default_draft, target or default_target
    t = settings.trainer
    overrides.pop("_redis_handle", None)
    kw = {"redis_url": url, "cache_dir": str(settings.cache_dir), "base_draft": str(base), "method": method,
          "target_model": str(target) if target else None,
          "stream": settings.redis.stream, "key_prefix": settings.redis.key_prefix, "group": t.consumer_group,
          "loss": t.loss, "eta": t.eta, "gamma": t.gamma, "lr": t.lr_for(method), "batch_positions": t.batch_positions,
          "grad_clip": t.grad_clip, "threads": t.threads, "num_positions": settings.engine.num_speculative_tokens,
          "max_context": settings.engine.max_model_len, "metrics_port": t.metrics_port, "public_url": t.public_url}
    kw.update(overrides)
    return WorkerConfig(**kw)


def run_worker(settings, **overrides) -> None:
    """What `lkserve worker` calls: build the config from Settings (+ overrides: any WorkerConfig field), run."""
    logging.basicConfig(level=os.environ.get("LKSERVE_LOG_LEVEL", "INFO"), format="%(message)s")
    Worker(config_from_settings(settings, **overrides)).run()
