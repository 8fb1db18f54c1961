"""GET /dashboard: a live page (one static HTML file, plain SVG, no build step, nothing fetched from the internet)
showing acceptance rate, tau, tokens/s, acceptance per draft position and the draft version timeline.
GET /dashboard/data: the JSON it draws from. Neither needs a key (like /metrics and /health), so neither shows
checkpoint paths, hashes or error texts: those stay behind the admin key (GET /admin/draft).

Everything is read from the process's Prometheus registry (the `lkserve_*` series of lkserve.metrics.serving):

- `counters`: cumulative totals now, overall and per draft version (with per-position drafted/accepted).
- `current`: the serving version's acceptance rate (accepted / drafted), tau (1 + accepted / drafts) and
  per-position acceptance, since it began serving (the numbers at the top of the page).
- `series`: snapshots {t, drafted, accepted, drafts, tokens, version} taken every SAMPLE_INTERVAL seconds by a
  sampler that runs for the app's lifetime, kept for HISTORY_SECONDS (so a page opened now draws the last hour).
  `drafted`, `accepted` and `drafts` are summed over versions and never go down, even when the metrics drop the
  series of old versions; the page computes acceptance, tau and tokens/s over windows between snapshots.
  `?since=<t>` returns only the snapshots taken after t (the page polls with it).
- `spec_k`: the K policy for the serving version (lkserve.gateway.spec_k): recommended K, expected speedup over
  no speculation, the recent conditional acceptance per position, the K drafted now.
- `timeline`: draft swaps from the DraftManager's history (the same one GET /admin/draft shows), plus version
  changes the sampler saw that did not go through it (source "observed").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import REGISTRY

from lkserve.gateway.spec_k import K_POLICY

log = logging.getLogger("lkserve.gateway.dashboard")

SAMPLE_INTERVAL = 1.0  # seconds between snapshots
HISTORY_SECONDS = 3600.0  # snapshots kept
TOKENS_WINDOW = 10.0  # tokens/s at the top of the page: over (at least) the last this many seconds
PAGE = Path(__file__).parent / "static" / "dashboard.html"

# Sample names (prometheus_client's restricted registry matches these).
DRAFTS = "lkserve_spec_drafts_total"
DRAFT_TOKENS = "lkserve_spec_draft_tokens_total"
ACCEPTED = "lkserve_spec_accepted_tokens_total"
GEN_TOKENS = "lkserve_generation_tokens_total"
VERSION_INFO = "lkserve_draft_version_info"
SWAPS = "lkserve_draft_swaps_total"
REQUESTS = "lkserve_requests_total"
NAMES = (DRAFTS, DRAFT_TOKENS, ACCEPTED, GEN_TOKENS, VERSION_INFO, SWAPS, REQUESTS)


# ------------------------------------------------------------------------------------------------- reading
def read_counters(registry=REGISTRY) -> dict[str, Any]:
    """Cumulative totals now: overall, per finish reason / swap result, and per draft version (per position)."""
    versions: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"drafts": 0.0, "drafted": 0.0, "accepted": 0.0, "tokens": 0.0, "requests": {},
                           "swaps": {}, "serving": None}

    def ver(name: str) -> dict[str, Any]:
        return versions.setdefault(name, {"drafts": 0.0, "drafted": 0.0, "accepted": 0.0, "positions": {}})

    for family in registry.restricted_registry(NAMES).collect():
        for s in family.samples:
            labels, value = s.labels, float(s.value)
            if s.name == DRAFTS:
                ver(labels.get("version", "unknown"))["drafts"] += value
            elif s.name in (DRAFT_TOKENS, ACCEPTED):
                v = ver(labels.get("version", "unknown"))
                key = "drafted" if s.name == DRAFT_TOKENS else "accepted"
                v[key] += value
                pos = v["positions"].setdefault(labels.get("position", "0"), {"drafted": 0.0, "accepted": 0.0})
                pos[key] += value
            elif s.name == GEN_TOKENS:
                out["tokens"] += value
            elif s.name == VERSION_INFO:
                if value >= 1:
                    out["serving"] = labels.get("version")
            elif s.name == SWAPS:
                out["swaps"][labels.get("result", "?")] = value
            elif s.name == REQUESTS:
                out["requests"][labels.get("finish_reason", "?")] = value
    for v in versions.values():
        v["positions"] = [{"position": int(p) if p.isdigit() else p, **c}
                          for p, c in sorted(v["positions"].items(), key=lambda kv: _position_key(kv[0]))]
        for key in ("drafts", "drafted", "accepted"):
            out[key] += v[key]
    out["versions"] = versions
    return out


def _position_key(p: str) -> tuple[int, Any]:
    return (0, int(p)) if p.isdigit() else (1, p)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarize(version: str | None, counters: dict[str, Any]) -> dict[str, Any]:
    """acceptance rate (accepted / drafted), tau (1 + accepted / drafts) and per-position acceptance of a version
    (None where nothing was drafted yet)."""
    v = counters["versions"].get(version or "") or {"drafts": 0.0, "drafted": 0.0, "accepted": 0.0, "positions": []}
    tau = _ratio(v["accepted"], v["drafts"])
    return {
        "version": version,
        "drafts": v["drafts"], "drafted": v["drafted"], "accepted": v["accepted"],
        "acceptance_rate": _ratio(v["accepted"], v["drafted"]),
        "tau": None if tau is None else 1.0 + tau,
        "positions": [{**p, "acceptance": _ratio(p["accepted"], p["drafted"])} for p in v["positions"]],
    }


def serving_version(engine, counters: dict[str, Any]) -> str | None:
    version = getattr(engine, "draft_version", None) if engine is not None else None
    return str(version) if version is not None else counters.get("serving")


# ------------------------------------------------------------------------------------------------- sampling
class Sampler:
    """A bounded ring of snapshots. `drafted`/`accepted`/`drafts` add up the increases of every version's
    counters, so they never go down when old versions' series are removed from the registry."""

    def __init__(self, interval: float = SAMPLE_INTERVAL, seconds: float = HISTORY_SECONDS):
        self.interval = interval
        self.seconds = seconds
        self.instance = f"{time.time():.6f}"  # a restarted gateway starts a new history: the page starts over
        self.samples: deque[dict[str, Any]] = deque(maxlen=math.ceil(seconds / interval) + 2)
        self.changes: deque[dict[str, Any]] = deque(maxlen=200)  # {version, at}: versions seen to start serving
        self._seen: dict[str, tuple[float, float, float]] = {}
        self._totals = [0.0, 0.0, 0.0]  # drafted, accepted, drafts
        self._task: asyncio.Task | None = None

    def sample(self, engine, counters: dict[str, Any] | None = None, now: float | None = None,
               min_gap: float | None = None) -> dict[str, Any] | None:
        """Take a snapshot (unless the last one is less than `min_gap` seconds old)."""
        now = time.time() if now is None else now
        if min_gap is not None and self.samples and now - self.samples[-1]["t"] < min_gap:
            return None
        counters = read_counters() if counters is None else counters
        seen = {}
        for name, v in counters["versions"].items():
            cur = (v["drafted"], v["accepted"], v["drafts"])
            prev = self._seen.get(name, (0.0, 0.0, 0.0))
            for i in range(3):
                # a counter that went down was reset (or removed and re-created): count it from zero
                self._totals[i] += cur[i] - prev[i] if cur[i] >= prev[i] else cur[i]
            seen[name] = cur
        self._seen = seen
        version = serving_version(engine, counters)
        if version is not None and (not self.samples or self.samples[-1]["version"] != version):
            self.changes.append({"version": version, "at": now})
        snap = {"t": round(now, 3), "drafted": self._totals[0], "accepted": self._totals[1],
                "drafts": self._totals[2], "tokens": counters["tokens"], "version": version}
        self.samples.append(snap)
        while self.samples and self.samples[0]["t"] < now - self.seconds:
            self.samples.popleft()
        return snap

    def since(self, t: float | None) -> list[dict[str, Any]]:
        if t is None:
            return list(self.samples)
        return [s for s in self.samples if s["t"] > t]

    def tokens_per_s(self, window: float = TOKENS_WINDOW) -> float | None:
        """Generated tokens per second between the newest snapshot and the newest one at least `window` s older
        (or the oldest one)."""
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        first = self.samples[0]
        for s in reversed(self.samples):
            if last["t"] - s["t"] >= window:
                first = s
                break
        dt = last["t"] - first["t"]
        return max(0.0, last["tokens"] - first["tokens"]) / dt if dt > 0 else None

    # -- the background task ---------------------------------------------------------------------------------
    def start(self, app: FastAPI) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(app))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, app: FastAPI) -> None:
        while True:
            try:
                gw = getattr(app.state, "gw", None)
                self.sample(getattr(gw, "engine", None), min_gap=self.interval * 0.5)
            except Exception:  # never let the page's sampler die
                log.exception("dashboard sample failed")
            await asyncio.sleep(self.interval)


def get_sampler(app: FastAPI) -> Sampler:
    """The app's sampler. Created here when the lifespan did not run (then it samples only when asked)."""
    sampler = getattr(app.state, "dashboard_sampler", None)
    if sampler is None:
        sampler = app.state.dashboard_sampler = Sampler()
    return sampler


@asynccontextmanager
async def lifespan(app: FastAPI):
    sampler = get_sampler(app)
    sampler.start(app)
    try:
        yield
    finally:
        await sampler.stop()


# ------------------------------------------------------------------------------------------------- timeline
def timeline(history: list[Any], changes: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Swaps (ok or refused) from the DraftManager's history, plus the version changes the sampler saw that no
    successful history entry explains (a swap made on the engine directly; or the version serving at start)."""
    entries = []
    for h in history:
        h = h.model_dump() if hasattr(h, "model_dump") else dict(h)
        entries.append({"version": h["version"], "at": h["at"], "source": h["source"], "ok": bool(h["ok"]),
                        "seconds": h.get("seconds")})
    for i, c in enumerate(changes):
        same = [e for e in entries if e["ok"] and e["version"] == c["version"]]
        explained = any(abs(e["at"] - c["at"]) <= tolerance for e in same)
        if i == 0 and not explained:  # the version serving when the sampler started: its last swap may be older
            before = [e for e in entries if e["ok"] and e["at"] <= c["at"]]
            explained = bool(before) and before[-1]["version"] == c["version"]
        if not explained:
            entries.append({"version": c["version"], "at": c["at"], "source": "observed", "ok": True,
                            "seconds": None})
    entries.sort(key=lambda e: e["at"])
    return entries


def _draft_status(gw) -> dict[str, Any]:
    drafts = getattr(gw, "drafts", None)
    if drafts is None:
        return {"version": None, "subscriber_running": False, "announcements_received": 0, "history": []}
    return drafts.status()  # the same status GET /admin/draft returns


# ------------------------------------------------------------------------------------------------- routes
router = APIRouter(lifespan=lifespan)


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


def _float(value: str | None) -> float | None:
    try:
        f = float(value) if value is not None else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) else None


@router.get("/dashboard/data", include_in_schema=False)
async def dashboard_data(request: Request) -> JSONResponse:
    gw = getattr(request.app.state, "gw", None)
    engine = getattr(gw, "engine", None)
    sampler = get_sampler(request.app)
    now = time.time()
    counters = read_counters()
    sampler.sample(engine, counters, now, min_gap=sampler.interval)  # fresh when the page asks (≥ 1 s apart)
    version = serving_version(engine, counters)
    status = _draft_status(gw)
    since = _float(request.query_params.get("since"))
    if request.query_params.get("instance") not in (None, sampler.instance):
        since = None  # another gateway process (restarted): send the whole history
    body = {
        "now": now,
        "instance": sampler.instance,
        "interval": sampler.interval,
        "history_seconds": sampler.seconds,
        "version": version,
        "model": getattr(engine, "model_id", None),
        "started_at": getattr(gw, "started_at", None),
        "counters": counters,
        "current": summarize(version, counters),
        "spec_k": K_POLICY.summary(version),
        "tokens_per_s": sampler.tokens_per_s(),
        "tokens_window": TOKENS_WINDOW,
        "draft": {"version": status.get("version"), "subscriber_running": status.get("subscriber_running"),
                  "announcements_received": status.get("announcements_received")},
        "timeline": timeline(list(status.get("history") or []), list(sampler.changes),
                             tolerance=2 * sampler.interval + 2.0),
        "series": sampler.since(since),
        "partial": since is not None,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})

