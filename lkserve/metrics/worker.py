"""Worker metrics (`lkserve worker`, its own /metrics port): training, the held-out gate, publishing, rollback,
and the capture stream it consumes. Positions are 0-based, as on the serving side."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

log = logging.getLogger("lkserve.worker")

M_STEPS = Counter("lkserve_worker_steps_total", "Optimizer steps")
M_LOSS = Gauge("lkserve_worker_loss", "Training loss of the last step")
M_ALPHA = Gauge("lkserve_worker_train_alpha", "Training alpha of the last step per draft position", ["position"])
M_LAMBDA = Gauge("lkserve_worker_lambda", "LK-lambda KL weight of the last step per draft position", ["position"])
M_HELD_ALPHA = Gauge("lkserve_worker_heldout_alpha", "Held-out alpha (mean over positions)", ["model"])
M_HELD_TAU = Gauge("lkserve_worker_heldout_tau", "Held-out tau (chain formula)", ["model"])
M_HELD_ALPHA_POS = Gauge("lkserve_worker_heldout_alpha_position", "Held-out alpha per draft position",
                         ["model", "position"])
M_RECORDS = Counter("lkserve_worker_records_total", "Capture records consumed", ["split"])
M_RPS = Gauge("lkserve_worker_records_per_second", "Records consumed per second (last minute-ish)")
M_POSITIONS = Counter("lkserve_worker_positions_trained_total", "Fresh positions trained on")
M_PUBLISHED = Counter("lkserve_worker_versions_published_total", "Draft versions published")
M_REJECTED = Counter("lkserve_worker_versions_rejected_total", "Candidates refused by the gate")
M_ROLLED_BACK = Counter("lkserve_worker_versions_rolled_back_total", "Automatic rollbacks")
M_PAUSED = Gauge("lkserve_worker_paused", "1 while adaptation is paused")
M_LIVE = Gauge("lkserve_worker_live_acceptance", "Live acceptance from capture records", ["role"])
M_CKPT = Counter("lkserve_worker_checkpoints_total", "Durable training-state checkpoints")
M_ACKED = Counter("lkserve_worker_records_acked_total", "Stream entries acked (after a checkpoint)")
M_LAST_STEP = Gauge("lkserve_worker_last_step_timestamp_seconds", "Unix time of the last optimizer step")
M_STREAM_LEN = Gauge("lkserve_capture_stream_length", "Entries in the capture stream (XLEN)")
M_STREAM_LAG = Gauge("lkserve_capture_consumer_lag", "Stream entries not yet delivered to the worker group")
M_STREAM_PENDING = Gauge("lkserve_capture_consumer_pending", "Entries delivered to the group but not acknowledged")


def observe_stream(client, stream: str, group: str) -> None:
    """Stream length and the group's lag / pending count (XINFO GROUPS; lag needs Redis >= 7)."""
    try:
        M_STREAM_LEN.set(client.xlen(stream))
        for g in client.xinfo_groups(stream):
            name = g.get("name", g.get(b"name"))
            if (name.decode() if isinstance(name, bytes) else name) == group:
                M_STREAM_PENDING.set(int(g.get("pending", 0) or 0))
                lag = g.get("lag")
                if lag is not None:
                    M_STREAM_LAG.set(int(lag))
    except Exception as e:  # noqa: BLE001 - metrics must never stop training
        log.debug("stream metrics not refreshed: %r", e)
