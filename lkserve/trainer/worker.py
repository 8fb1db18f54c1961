"""The adaptation worker: consume capture records -> replay -> train -> evaluate -> gate -> publish -> watch rollback.

One loop, one thread (the engine owns the rest of the CPU; the HTTP port, lkserve.trainer.http, has its own):

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
import time
from pathlib import Path

import redis

from lkserve.capture.reader import StreamReader
from lkserve.config import Settings
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
from lkserve.trainer.http import WorkerHTTP
from lkserve.trainer.publish import clean_partial, publish, register_base
from lkserve.trainer.replay import ReplayBuffer
from lkserve.trainer.rollback import RollbackMonitor, manual_rollback
from lkserve.trainer.state import AckTracker, TrainingStateStore, read_own_pending
from lkserve.trainer.train import set_threads

log = logging.getLogger("lkserve.worker")


def _event(event: str, **fields) -> None:
    log.info(json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str))


class Worker:
    """The loop. `settings` is taken as is: redis.url and engine.draft_model must be set (and engine.target_model
    for an EAGLE-3 head); `run_worker` fills them in (embedded Redis, default models) when they are not."""

    def __init__(self, settings: Settings):
        if not settings.redis.url or not settings.engine.draft_model:
            raise ValueError("the worker needs settings.redis.url and settings.engine.draft_model (see run_worker)")
        self.settings = settings
        self.cfg = cfg = settings.trainer
        self.method = settings.engine.method
        self.base_draft = settings.engine.draft_model
        self.cache_dir = Path(settings.cache_dir)
        self.stream = settings.redis.stream
        self.state_dir = cfg.state_dir or self.cache_dir / "worker" / cfg.consumer
        set_threads(cfg.threads)
        self.ops = ops_for(settings)
        self.client = redis.Redis.from_url(settings.redis.url)
        self.registry = DraftRegistry(self.client, settings.redis.key_prefix, public_url=cfg.public_url)
        self.reader = StreamReader(settings.redis.url, self.stream, cfg.consumer_group, cfg.consumer,
                                   claim_min_idle_ms=cfg.claim_min_idle_ms)
        self.store = TrainingStateStore(self.state_dir)
        self.tracker = AckTracker()
        self.replay = ReplayBuffer(cfg.heldout_fraction, cfg.heldout_records, cfg.reservoir_records,
                                   cfg.replay_ratio, cfg.seed)
        self.gate = Gate(cfg.gate_margin, cfg.gate_metric, cfg.gate_min_rows, evaluate=self.ops.evaluate)
        self.monitor = RollbackMonitor(cfg.rollback_window_tokens, cfg.rollback_margin)
        self.http: WorkerHTTP | None = None
        self.ledger: list[str] = []
        self.counters = {"records": 0, "heldout_records": 0, "positions_trained": 0, "published": 0,
                         "rejected": 0, "rolled_back": 0, "records_without_hidden_states": 0,
                         "teacher_forced_records": 0, "teacher_seconds": 0.0}
        self.teacher = self._teacher() if cfg.teacher_forcing else None
        self.last_eval: dict = {}
        self.stopping = False
        self._steps_since_eval = 0
        self._steps_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._rate_t0, self._rate_n = time.monotonic(), 0
        self._setup()

    # -- teacher forcing (trainer.teacher_forcing) -------------------------------------------------------------
    def _teacher(self):
        """(target model, aux layers or None) for labelling served contexts (lkserve.trainer.teacher)."""
        from lkserve.trainer import teacher

        target = self.settings.engine.target_model
        if not target:
            raise ValueError("trainer.teacher_forcing needs engine.target_model")
        aux = teacher.aux_layers_of(self.base_draft) if self.method == "eagle3" else None
        return teacher.load_target(target), aux

    def _teacher_forced(self, rec):
        """`rec` relabelled by the target at every position of its context (same request id, so the same side of the
        held-out split; same draft version and tags). Records of a request split into chunks overlap: each chunk
        is relabelled over its own context."""
        from lkserve.trainer import teacher

        model, aux = self.teacher
        t0 = time.perf_counter()
        out = teacher.teacher_records(model, [list(map(int, rec.context_token_ids))], top_k=self.settings.capture.top_k,
                                      temperature=rec.temperature, num_positions=self.settings.engine.num_speculative_tokens,
                                      aux_layer_ids=aux, window=self.settings.engine.max_model_len,
                                      hidden_dtype=self.settings.capture.hidden_dtype, tags=rec.tags)
        self.counters["teacher_seconds"] += time.perf_counter() - t0
        if len(out) != 1:  # shorter than teacher_records' minimum: keep what serving captured
            return rec
        new = out[0]
        new.request_id, new.draft_version, new.model_id = rec.request_id, rec.draft_version, rec.model_id
        self.counters["teacher_forced_records"] += 1
        return new

    # -- setup / restore --------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        removed = clean_partial(self.cache_dir)
        register_base(self.registry, self.base_draft, cfg.base_version)
        state = self.store.load()
        start_dir = self.base_draft
        if state is None:  # no training state: continue from whatever serves now
            cur = self.registry.get(self.registry.current() or cfg.base_version)
            start_dir = cur["path"] if cur else self.base_draft
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
        pending = read_own_pending(self.client, self.stream, cfg.consumer_group, cfg.consumer)
        self._intake(pending)
        # logged by run() once SIGTERM is handled: a supervisor that sees it may stop the worker cleanly
        self._start_event = {"consumer": cfg.consumer, "restored_checkpoint": state is not None,
                             "step": self.trainer.step_count, "own_pending": len(pending),
                             "acked_from_checkpoint": restored, "removed_partial_dirs": removed,
                             "serving": self.serving_version, "loss": cfg.loss, "method": self.method}

    def _load_serving(self) -> None:
        version = self.registry.current() or self.cfg.base_version
        if version == self.serving_version:
            return
        meta = self.registry.get(version)
        self.serving_model = self.ops.load(meta["path"]) if meta else self.ops.copy(self.trainer.model)
        self.serving_version = version

    # -- loop -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Until stopped (SIGTERM/SIGINT, `exit_when_drained`, `max_steps`); the HTTP port lives exactly as long."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self.stop())
            except ValueError:  # not the main thread
                pass
        _event("worker_start", **self._start_event)
        if self.cfg.metrics_port is not None:  # 0: any free port (self.http.port)
            self.http = WorkerHTTP(self.registry.get, port=self.cfg.metrics_port).start()
        try:
            while not self.stopping:
                self.run_once()
                if self.cfg.max_steps is not None and self.trainer.step_count >= self.cfg.max_steps:
                    break
        finally:
            try:
                self.checkpoint(force=True)
            finally:
                if self.http is not None:
                    self.http.stop()
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
        while self.replay.fresh_positions >= self.cfg.fresh_threshold() and not self.stopping:
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
            if self.method == "eagle3" and rec.num_positions and rec.hidden_states is None:
                self.counters["records_without_hidden_states"] += 1
                if self.counters["records_without_hidden_states"] == 1:
                    _event("warning", message="EAGLE-3 training needs records with the target's hidden states: "
                                              "set LKSERVE_CAPTURE__HIDDEN_STATES=true on the gateways")
            if self.teacher is not None and rec.num_positions:
                rec = self._teacher_forced(rec)
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
            observe_stream(self.client, self.stream, self.cfg.consumer_group)

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
        meta = publish(self.registry, self.trainer.model, self.base_draft, self.cache_dir,
                       save=self.ops.save, metadata={
            "method": self.method, "loss": self.cfg.loss, "eta": self.cfg.eta, "step": self.trainer.step_count,
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
                 "ledger": self.ledger, "counters": dict(self.counters), "config": self.settings.model_dump(mode="json"),
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


def resolve_models(settings: Settings) -> Settings:
    """`settings` with the draft (and, for an EAGLE-3 head, the target) filled in by the default SmolLM2 models when
    unset; a draft model trains without its target."""
    method, engine = settings.engine.method, settings.engine
    if engine.draft_model is not None and (engine.target_model is not None or method != "eagle3"):
        return settings
    from lkserve.models.prepare import prepare_default_models

    target, draft = prepare_default_models(settings.cache_dir, method=method)
    engine = engine.model_copy(update={"draft_model": engine.draft_model or str(draft),
                                       "target_model": engine.target_model or str(target)})
    return settings.model_copy(update={"engine": engine})


def run_worker(settings: Settings) -> None:
    """What `lkserve worker` calls: an embedded Redis if no URL is set (stopped at exit), default models, run."""
    from lkserve.capture.embedded_redis import resolve_redis_url

    logging.basicConfig(level=os.environ.get("LKSERVE_LOG_LEVEL", "INFO"), format="%(message)s")
    url, handle = resolve_redis_url(settings)
    try:
        settings = resolve_models(settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})}))
        Worker(settings).run()
    finally:
        if handle is not None:
            handle.stop()
