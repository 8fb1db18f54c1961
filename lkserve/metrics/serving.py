"""Serving-side metrics (the gateway process): speculative acceptance by draft position AND draft version,
latency, tokens, swaps, and the capture counters of vLLM's engine process.

Acceptance follows vLLM's definitions, in PromQL:
    acceptance rate = sum(rate(lkserve_spec_accepted_tokens_total[5m])) / sum(rate(lkserve_spec_draft_tokens_total[5m]))
    tau (mean acceptance length) = 1 + sum(rate(lkserve_spec_accepted_tokens_total[5m]))
                                       / sum(rate(lkserve_spec_drafts_total[5m]))
Labelling by `version` shows the effect of each swap. Cardinality stays bounded: only the last
`VERSIONS_KEPT` draft versions keep their series; older ones are removed (their last values were scraped already).
Positions are 0-based (vLLM's `position` label uses the same convention): K positions per version.

Counts are taken in the process that runs `Engine.generate` (the gateway), from vLLM's per-request detailed
spec-decode metrics, so nothing is lost when vLLM runs its engine core in another process. The capture
counters, which live in the engine core's process, are read over RPC (`EngineStatsCollector`).
"""

from __future__ import annotations

import collections
import sys
import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

VERSIONS_KEPT = 8

DRAFTS = Counter("lkserve_spec_drafts_total", "Verification steps that verified at least one draft token",
                 ["version"])
DRAFT_TOKENS = Counter("lkserve_spec_draft_tokens_total", "Draft tokens proposed, by draft position (0-based)",
                       ["version", "position"])
ACCEPTED_TOKENS = Counter("lkserve_spec_accepted_tokens_total", "Draft tokens accepted, by draft position (0-based)",
                          ["version", "position"])
DRAFT_VERSION = Gauge("lkserve_draft_version_info", "1 for the draft version serving now, 0 for earlier ones",
                      ["version"])
SWAPS = Counter("lkserve_draft_swaps_total", "Draft hot-swaps attempted, by result (ok, failed)", ["result"])
SWAP_SECONDS = Histogram("lkserve_draft_swap_seconds", "Time of a draft hot-swap (validate + load), successful ones",
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REQUESTS = Counter("lkserve_requests_total", "Engine requests finished, by finish reason (stop, length, abort)",
                   ["finish_reason"])
PROMPT_TOKENS = Counter("lkserve_prompt_tokens_total", "Prompt tokens of finished engine requests")
GENERATED_TOKENS = Counter("lkserve_generation_tokens_total", "Tokens generated (streamed to clients)")
TTFT = Histogram("lkserve_time_to_first_token_seconds", "Time from request submission to its first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ITL = Histogram("lkserve_inter_token_latency_seconds",
                "Time between two streamed tokens (a step that emits n tokens counts n gaps of 1/n of it)",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
E2E = Histogram("lkserve_request_duration_seconds", "Time from request submission to its last token",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160))

# Recent per-position counts per version, for the K policy (lkserve.gateway.spec_k): one entry per finished request,
# (steps that drafted, drafted per position, accepted per position), kept while the newest entries hold at most
# WINDOW_STEPS steps (set_window). Cumulative counters would let a long first hour outvote what the draft does now.
WINDOW_STEPS = [2000]
_windows: dict[str, collections.deque[tuple[int, list[int], list[int]]]] = {}
_window_steps: dict[str, int] = {}

_lock = threading.Lock()
_versions: collections.OrderedDict[str, set[str]] = collections.OrderedDict()  # version -> positions seen
_current: list[str | None] = [None]  # the version serving now: never aged out


def _touch_version(version: str, positions: range) -> None:
    """Remember which series exist for `version`; drop the series of versions beyond the newest VERSIONS_KEPT."""
    with _lock:
        seen = _versions.setdefault(version, set())
        _versions.move_to_end(version)
        seen.update(str(p) for p in positions)
        while len(_versions) > VERSIONS_KEPT:
            old, old_positions = _versions.popitem(last=False)
            if old == _current[0]:
                _versions[old] = old_positions  # keep it (now the newest entry) and age out the next one
                continue
            for metric in (DRAFTS, DRAFT_VERSION):
                _remove(metric, old)
            _windows.pop(old, None)
            _window_steps.pop(old, None)
            for p in old_positions:
                _remove(DRAFT_TOKENS, old, p)
                _remove(ACCEPTED_TOKENS, old, p)


def _remove(metric, *labels) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def observe_spec(version: str | None, spec) -> None:
    """One finished request's speculative statistics (lkserve.engine.SpecStats)."""
    if spec is None or not spec.drafted:
        return
    version = version or "unknown"
    k = len(spec.per_position_drafted)
    _touch_version(version, range(k))
    steps = sum(1 for d in spec.per_step_drafted if d > 0)
    DRAFTS.labels(version).inc(steps)
    for p in range(k):
        DRAFT_TOKENS.labels(version, str(p)).inc(spec.per_position_drafted[p])
        ACCEPTED_TOKENS.labels(version, str(p)).inc(spec.per_position_accepted[p])
    _add_to_window(version, steps, list(spec.per_position_drafted), list(spec.per_position_accepted))


def _add_to_window(version: str, steps: int, drafted: list[int], accepted: list[int]) -> None:
    with _lock:
        if version not in _versions:  # aged out meanwhile
            return
        win = _windows.setdefault(version, collections.deque())
        win.append((steps, drafted, accepted))
        total = _window_steps.get(version, 0) + steps
        while len(win) > 1 and total - win[0][0] >= WINDOW_STEPS[0]:
            total -= win.popleft()[0]
        _window_steps[version] = total


def set_window(steps: int) -> None:
    """How many recent verification steps `recent_position_counts` covers (at least; whole requests)."""
    WINDOW_STEPS[0] = max(1, int(steps))


def recent_position_counts(version: str) -> tuple[int, list[int], list[int]]:
    """(steps, drafted per position, accepted per position) over the version's last ~WINDOW_STEPS steps."""
    with _lock:
        win = list(_windows.get(version, ()))
    k = max((len(d) for _, d, _ in win), default=0)
    drafted, accepted = [0] * k, [0] * k
    for _, d, a in win:
        for j in range(len(d)):
            drafted[j] += d[j]
            accepted[j] += a[j]
    return sum(s for s, _, _ in win), drafted, accepted


def window_versions() -> list[str]:
    with _lock:
        return [v for v in _versions if _windows.get(v)]


def observe_request(finish_reason: str | None, prompt_tokens: int, ttft: float | None, e2e: float) -> None:
    REQUESTS.labels(finish_reason or "abort").inc()
    PROMPT_TOKENS.inc(prompt_tokens)
    if ttft is not None:
        TTFT.observe(ttft)
    E2E.observe(e2e)


def observe_tokens(n: int, gap: float | None) -> None:
    """n tokens arrived together, `gap` seconds after the previous ones (None for the first chunk)."""
    GENERATED_TOKENS.inc(n)
    if gap is not None and n > 0:
        for _ in range(n):
            ITL.observe(gap / n)


def observe_swap(ok: bool, version: str, seconds: float) -> None:
    SWAPS.labels("ok" if ok else "failed").inc()
    if ok:
        SWAP_SECONDS.observe(seconds)
        set_version(version)


def current_version() -> str | None:
    return _current[0]


def set_version(version: str | None) -> None:
    if not version:
        return
    _current[0] = version
    _touch_version(version, range(0))
    with _lock:
        for v in _versions:
            DRAFT_VERSION.labels(v).set(1 if v == version else 0)


class EngineStatsCollector:
    """Re-exports the capture counters kept in vLLM's engine process, from the last `engine.info()` a background
    task fetched (`update`): a scrape never waits on an RPC."""

    def __init__(self):
        self._capture: dict = {}
        self._include_sink = False

    def update(self, info: dict, engine_in_process: bool) -> None:
        """engine_in_process: the sink's own counters (lkserve.capture.metrics) already live in this process's
        registry, so only the engine-side counts are re-exported; otherwise the sink's are re-exported too."""
        self._capture = dict(info.get("capture") or {})
        self._include_sink = not engine_in_process

    def collect(self):
        c = self._capture
        if not c:
            return
        families = [
            ("lkserve_capture_records", "Verification records the engine handed to its capture sink", "records"),
            ("lkserve_capture_positions", "Verified draft positions in those records", "positions"),
            ("lkserve_capture_engine_dropped", "Records the engine could not hand over (sink full)", "dropped"),
            ("lkserve_capture_hook_seconds", "Time spent in the capture hook inside vLLM's step", "hook_seconds"),
        ]
        for name, doc, key in families:
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], float(c.get(key, 0) or 0))
            yield fam
        # same names and meaning as lkserve.capture.metrics, counted in the engine process; skipped where this process
        # writes records itself (it then registers those names already, and one name twice breaks the exposition)
        if self._include_sink and "lkserve.capture.metrics" not in sys.modules:
            written = CounterMetricFamily("lkserve_capture_records_written",
                                          "Verification records written to the capture stream")
            written.add_metric([], float(c.get("sink_written", 0) or 0))
            yield written
            dropped = CounterMetricFamily("lkserve_capture_records_dropped", "Verification records not written",
                                          labels=["reason"])
            for reason, n in sorted((c.get("sink_dropped_by_reason") or {}).items()):
                dropped.add_metric([reason], float(n))
            yield dropped
        enabled = GaugeMetricFamily("lkserve_capture_enabled", "1 while capture is on")
        enabled.add_metric([], 1.0 if c.get("enabled") else 0.0)
        yield enabled
        rate = GaugeMetricFamily("lkserve_capture_sample_rate", "Fraction of requests captured")
        rate.add_metric([], float(c.get("sample_rate", 0.0)))
        yield rate


ENGINE_STATS = EngineStatsCollector()
REGISTRY.register(ENGINE_STATS)
