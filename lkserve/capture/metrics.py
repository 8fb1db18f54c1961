"""Prometheus counters of the capture path: a silent drop is the one failure nobody would otherwise notice."""

from __future__ import annotations

from prometheus_client import Counter

RECORDS_WRITTEN = Counter(
    "lkserve_capture_records_written_total", "Verification records written to the capture stream"
)
RECORDS_DROPPED = Counter(
    "lkserve_capture_records_dropped_total",
    "Verification records not written: queue_full, redis_error, invalid (writer); sampled_out (engine)",
    ["reason"],
)
RECORDS_UNDECODABLE = Counter(
    "lkserve_capture_records_undecodable_total",
    "Stream entries a reader could not decode (acked and set aside)",
)


def count_written(n: int = 1) -> None:
    RECORDS_WRITTEN.inc(n)


def count_dropped(reason: str, n: int = 1) -> None:
    RECORDS_DROPPED.labels(reason=reason).inc(n)
