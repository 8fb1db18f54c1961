"""`lkserve demo`: the whole loop on one machine, watched live.

bootstrap              the draft it starts from: `lkserve draft bootstrap`'s run_bootstrap on the CHAT domain only
                       (MT-bench train split; settings.demo), cached under <cache>/demo/bootstrap/ for later runs;
                       served and trained as version "bootstrap" (`--no-bootstrap`: the untrained draft, "base")
embedded redis-server  <-  gateway (`lkserve serve`: vLLM + the SmolLM2 target + its draft, capture on)
                       <-  worker  (`python -m lkserve.trainer`: LK-lambda training, gate, publish)
traffic: several concurrent clients (the official `openai` client) send MT-bench questions, then HumanEval stubs
(a domain shift: code the bootstrap never saw), at T=1. Every response's usage says which draft version served it
and what it accepted, so the acceptance by version over time comes from the API itself. At the end: summary.json
(with `shift`: the static bootstrapped draft vs the adapted versions on the HumanEval traffic) and acceptance.png.
CPU: settings.demo.cpu_split ("worker_core": the training worker on a CPU of its own, the engine on the others).

Ctrl-C stops everything: the gateway and the worker run in their own process groups and are terminated (then
killed) on any exit; the embedded Redis is stopped last.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from lkserve.config import Settings

BOOTSTRAP_VERSION = "bootstrap"  # the bootstrapped draft's name in the demo's registry (trainer.base_version)
BOOTSTRAP_PREFIX = "lkserve-demo-bootstrap"  # the bootstrap's own registry keys (the demo's Redis, apart from serving)
BOOTSTRAP_DOMAINS = ("mtbench",)  # chat only: the HumanEval phase is the shift

# The demo's default draft, chosen by measurement: bench/results/draft_choice.json (README, "Which draft").
DEFAULT_METHOD = "draft_model"


@dataclass
class DemoConfig:
    minutes: float = 10.0
    clients: int = 3
    temperature: float = 1.0
    max_tokens: int = 128
    shift_at: float = 0.5  # fraction of the run after which traffic switches from MT-bench to HumanEval
    port: int = 0  # gateway port; 0 = a free one
    seed: int = 0
    out_dir: str | None = None  # default <cache>/demo/<timestamp>
    method: str = DEFAULT_METHOD  # the draft: "draft_model" (2-layer SmolLM2) or "eagle3" (a new EAGLE-3 head)
    static_version: str = "base"  # the version the gateway starts with (set by run_demo: "bootstrap" or "base")


@dataclass
class Sample:
    """One finished request, as its response reported it."""

    t: float  # seconds since traffic started
    phase: str
    version: str | None
    drafts: int
    drafted: int
    accepted: int
    tokens: int
    seconds: float


@dataclass
class DemoState:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    swaps: list[dict] = field(default_factory=list)  # {"t", "version"} when /ready first showed a version
    worker: dict = field(default_factory=dict)
    phase: str = "MT-bench"
    shift_t: float | None = None
    heldout: list[dict] = field(default_factory=list)  # the worker's gate evaluations over time
    worker_series: list[dict] = field(default_factory=list)  # {"t", "positions_trained", "steps"} every ~10 s
    t0: float | None = None  # time.monotonic() when traffic started


# -------------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    from lkserve.capture.embedded_redis import free_port as _free

    return _free()


class Child:
    """A subprocess in its own process group (vLLM spawns its engine core inside it): stopped as a whole."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name = name
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (e.g. vLLM's engine core)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def demo_worker_lr(settings: Settings, method: str, base_version: str) -> float | None:
    """demo.worker_lr; unset: a tenth of trainer.lr when the worker fine-tunes the bootstrapped draft (at the full
    rate its held-out alpha fell within 12 steps and nothing was published: docs/worker.md, "Fine-tuning a
    bootstrapped draft"), None (trainer.lr) for the untrained one."""
    if settings.demo.worker_lr:
        return settings.demo.worker_lr
    return settings.trainer.lr_for(method) / 10 if base_version == "bootstrap" else None


def worker_settings(settings: Settings, redis_url: str, draft_dir: Path, target_dir: Path, out: Path,
                    metrics_port: int, method: str, base_version: str = "base", threads: int | None = None) -> Settings:
    """The worker's Settings, tuned for a short CPU demo: small steps, frequent held-out evaluation. An EAGLE-3 head's
    records carry the target's hidden states (~1 MB per SmolLM2 request), so it keeps fewer of them in memory.
    `base_version`: the registry's name for `draft_dir` (what the gateway starts with); `threads`: torch threads
    (None: settings.trainer.threads)."""
    per_method = {"reservoir_records": 192, "heldout_records": 48} if method == "eagle3" else {}
    trainer = settings.trainer.model_copy(update={
        "consumer": "demo-worker", "batch_positions": 512, "min_fresh_positions": 256, "warmup_steps": 8,
        "eval_every_steps": 4, "gate_min_rows": 128, "checkpoint_every_steps": 20, "metrics_port": metrics_port,
        "public_url": f"http://127.0.0.1:{metrics_port}", "base_version": base_version,
        "teacher_forcing": settings.demo.teacher_forcing,
        **({"lr": lr} if (lr := demo_worker_lr(settings, method, base_version)) else {}),
        **({"threads": threads} if threads else {}), **per_method})
    engine = settings.engine.model_copy(update={"method": method, "draft_model": str(draft_dir),
                                                "target_model": str(target_dir)})
    return settings.model_copy(update={"cache_dir": out / "worker", "engine": engine, "trainer": trainer,
                                       "redis": settings.redis.model_copy(update={"url": redis_url})})


# -------------------------------------------------------------------------------------------------- CPU share
def cpu_split(mode: str) -> dict:
    """{"mode", "engine_cpus", "worker_cpus"}: "worker_core" gives the training worker the last half of the CPUs this
    process may use (at least one) and the gateway with its vLLM engine core the rest; "shared" (or a single CPU)
    pins nothing (None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "shared" or len(cpus) < 2:
        return {"mode": "shared" if mode == "shared" else f"{mode} (1 CPU: shared)", "engine_cpus": None,
                "worker_cpus": None}
    n_worker = max(1, len(cpus) // 2)
    return {"mode": mode, "engine_cpus": cpus[:-n_worker], "worker_cpus": cpus[-n_worker:]}


@contextlib.contextmanager
def pinned(cpus: list[int] | None):
    """This process pinned to `cpus` for the duration (children started inside inherit it); None: no change."""
    if not cpus:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def group_cpu(pgid: int) -> dict:
    """CPU of the live processes of process group `pgid` (/proc): {"cpu_seconds": user + system in all,
    "processes": [{"pid", "name", "cpu_seconds", "threads", "cpus"}]}; Linux only (empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            head, rest = (d / "stat").read_text().rsplit(")", 1)
            fields = rest.split()
            if int(fields[2]) != pgid:  # after the command: state ppid pgrp ... utime(11) stime(12)
                continue
            status = dict(ln.split(":", 1) for ln in (d / "status").read_text().splitlines() if ":" in ln)
        except (OSError, ValueError):
            continue
        procs.append({"pid": int(d.name), "name": head.split("(", 1)[1],
                      "cpu_seconds": round((int(fields[11]) + int(fields[12])) / tick, 1),
                      "threads": int(status.get("Threads", "0").strip() or 0),
                      "cpus": status.get("Cpus_allowed_list", "").strip()})
    return {"cpu_seconds": round(sum(p["cpu_seconds"] for p in procs), 1), "processes": procs}


# -------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_key(settings: Settings, target: str, draft: str, method: str, seed: int) -> dict:
    """What a cached demo bootstrap must agree with: models (the base draft by its weights' sha256), method, seed,
    the demo's bootstrap budget and the trainer knobs that change what it trains."""
    from lkserve.checkpoint import WEIGHTS_FILE, sha256_file
    from lkserve.trainer.bootstrap import offline_settings

    d, t = settings.demo, offline_settings(settings).trainer
    return {"target": str(Path(target).resolve()), "draft": str(Path(draft).resolve()),
            "draft_sha256": sha256_file(Path(draft) / WEIGHTS_FILE), "method": method, "seed": seed,
            "domains": list(BOOTSTRAP_DOMAINS), "prompts": d.bootstrap_prompts, "samples": d.bootstrap_samples,
            "max_tokens": d.bootstrap_max_tokens, "positions": d.bootstrap_positions, "minutes": d.bootstrap_minutes,
            "loss": t.loss, "eta": t.eta, "lr": t.lr_for(method), "batch_positions": t.batch_positions,
            "train_params": t.train_params, "precision": t.precision, "K": settings.engine.num_speculative_tokens,
            "top_k": settings.capture.top_k, "max_model_len": settings.engine.max_model_len}


def bootstrap_dir(settings: Settings, key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(settings.cache_dir) / "demo" / "bootstrap" / f"{key['method']}-{digest}"


@contextlib.contextmanager
def _vllm_quiet():
    """vLLM's INFO lines (stdout) would drown the demo's progress while it bootstraps: WARNING unless the user chose.
    Restored afterwards, so the gateway the demo starts next logs as the user asked."""
    had = os.environ.get("VLLM_LOGGING_LEVEL")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        yield
    finally:
        if had is None:
            os.environ.pop("VLLM_LOGGING_LEVEL", None)


def demo_bootstrap(settings: Settings, target: str, draft: str, method: str, seed: int, redis_url: str,
                   console) -> dict:
    """The bootstrapped draft the demo starts from: the cached one when `<cache>/demo/bootstrap/<method>-<key>/
    result.json` names a checkpoint whose sha256 still matches, else lkserve.trainer.bootstrap.run_bootstrap (the
    teacher source, the chat prompts only, settings.demo's budget; resumable from its state/ directory after a
    Ctrl-C), registered under the bootstrap's own keys of the demo's Redis and described in result.json."""
    from lkserve.checkpoint import WEIGHTS_FILE, sha256_file

    t0 = time.monotonic()
    key = bootstrap_key(settings, target, draft, method, seed)
    root = bootstrap_dir(settings, key)
    result_path = root / "result.json"
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        weights = Path(done["path"]) / WEIGHTS_FILE
        if done.get("key") == key and weights.is_file() and sha256_file(weights) == done["sha256"]:
            console.print(f"bootstrapped draft: cached {done['path']} (held-out alpha "
                          f"{done['heldout_before']['alpha_mean']:.3f} -> {done['heldout_after']['alpha_mean']:.3f})")
            return {**done, "cached": True, "seconds": round(time.monotonic() - t0, 1)}
        console.print(f"[yellow]{result_path} does not match its checkpoint: bootstrapping again[/yellow]")
    from lkserve.drafts import DraftRegistry
    from lkserve.trainer.bootstrap import run_bootstrap

    d = settings.demo
    console.print(f"bootstrapping the draft ({method}) on the chat domain only, once (cached in {root}): the "
                  f"target's own completions of the MT-bench train prompts ({d.bootstrap_samples} x "
                  f"{d.bootstrap_max_tokens} tokens each, no speculation), a teacher-forced target pass, then "
                  f"training for {d.bootstrap_positions} positions"
                  + (f" or {d.bootstrap_minutes:g} min" if d.bootstrap_minutes else "") + " ...")
    last = [0.0]

    def progress(step: int, positions: int, rate: float, alpha: float | None, eta: float | None) -> None:
        if time.monotonic() - last[0] < 5:
            return
        last[0] = time.monotonic()
        a = "-" if alpha is None else f"{alpha:.3f}"
        e = "-" if eta is None else f"{eta:.0f} s"
        console.print(f"  bootstrap step {step}: {positions} positions ({rate:.0f}/s), held-out alpha {a}, ETA {e}")

    boot = settings.model_copy(update={
        "cache_dir": root,
        "engine": settings.engine.model_copy(update={"target_model": target, "draft_model": draft, "method": method}),
        "redis": settings.redis.model_copy(update={"url": redis_url})})
    registry = DraftRegistry(redis_url, BOOTSTRAP_PREFIX)
    with _vllm_quiet():
        res = run_bootstrap(boot, registry, max_positions=d.bootstrap_positions, max_minutes=d.bootstrap_minutes,
                            seed=seed, announce=False, state_dir=root / "state", source="teacher",
                            domains=BOOTSTRAP_DOMAINS, max_prompts=d.bootstrap_prompts,
                            max_tokens=d.bootstrap_max_tokens, samples=d.bootstrap_samples, temperature=1.0,
                            progress=progress)
    meta = registry.get(res.version)
    done = {"key": key, "path": meta["path"], "sha256": meta["sha256"], "registered_as": res.version,
            "heldout_before": res.before, "heldout_after": res.after, "steps": res.steps,
            "positions_trained": res.positions_trained, "train_records": res.train_records,
            "heldout_records": res.heldout_records, "generate_seconds": round(res.generate_seconds, 1),
            "train_seconds": round(res.train_seconds, 1), "bootstrap_seconds": round(time.monotonic() - t0, 1),
            "resumed_from_step": res.resumed_step}
    result_path.write_text(json.dumps(done, indent=1, default=str) + "\n")
    console.print(f"bootstrapped in {done['bootstrap_seconds']:.0f} s (data {done['generate_seconds']:.0f} s, "
                  f"training {done['train_seconds']:.0f} s, {res.positions_trained} positions): held-out alpha "
                  f"{res.before['alpha_mean']:.3f} -> {res.after['alpha_mean']:.3f}, tau {res.before['tau']:.2f} -> "
                  f"{res.after['tau']:.2f}")
    return {**done, "cached": False, "seconds": done["bootstrap_seconds"]}


# -------------------------------------------------------------------------------------------------- the shift
def stream_records(redis_url: str, stream: str, page: int = 500):
    """Every record still in the capture stream, oldest first."""
    import redis

    from lkserve.capture.codec import decode
    from lkserve.capture.writer import FIELD

    client = redis.Redis.from_url(redis_url)
    try:
        start = "-"
        while True:
            entries = client.xrange(stream, min=start, max="+", count=page)
            for eid, fields in entries:
                if start != "-" and eid.decode() == start:
                    continue
                with contextlib.suppress(Exception):
                    yield decode(fields[FIELD])
            if len(entries) < page:
                return
            start = entries[-1][0].decode()
    finally:
        client.close()


def shift_report(worker: Settings, static_version: str, phase: str = "HumanEval", max_records: int = 400) -> dict:
    """The static draft (`static_version`: the bootstrapped one) vs the adapted versions on the shifted traffic
    (capture records tagged `domain=phase`), offline, once the demo's processes have stopped:

    - by_version: for each version that served that traffic, on the records it served (it was frozen before they
      came: none was trained into it): its served acceptance (accepted / verified drafted positions, what vLLM did),
      and the held-out alpha (the gate's expected acceptance, sum min(p, q) under the captured target distributions)
      of that version and of the static draft on the same records;
    - heldout: the worker's held-out split of that traffic (request-id hash, trainer.heldout_fraction; never trained
      on by any version): the static draft's gate alpha / tau vs the registry's current version at the end (the
      latest one the gate accepted and rollback kept)."""
    import numpy as np

    from lkserve.drafts import DraftRegistry
    from lkserve.trainer.drafts import ops_for
    from lkserve.trainer.replay import base_request_id, is_heldout
    from lkserve.trainer.train import set_threads

    set_threads(worker.trainer.threads)
    records = [r for r in stream_records(worker.redis.url, worker.redis.stream)
               if r.tags.get("domain") == phase and r.num_positions]
    registry = DraftRegistry(worker.redis.url, worker.redis.key_prefix)
    ops = ops_for(worker)
    models: dict[str, object] = {}

    def model(version: str):
        if version not in models:
            meta = registry.get(version)
            models[version] = ops.load(meta["path"]) if meta and Path(meta["path"]).is_dir() else None
        return models[version]

    out: dict = {"phase": phase, "static_version": static_version, "records": len(records), "by_version": {}}
    static = model(static_version)
    if static is None or not records:
        return {**out, "note": "no static checkpoint or no shifted records"}
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.draft_version, []).append(r)
    totals = {"positions": 0, "accepted": 0, "alpha_served_versions": 0.0, "alpha_static": 0.0, "rows": 0}
    for version, recs in groups.items():  # in the order they first served
        recs = recs[-max_records:]
        acc = np.concatenate([np.asarray(r.accepted, dtype=bool) for r in recs])
        row = {"records": len(recs), "positions": int(acc.size), "served_acceptance": round(float(acc.mean()), 4)}
        m = model(version)
        if m is not None:
            mine, stat = ops.evaluate(m, recs), ops.evaluate(static, recs)
            row.update(alpha_version=round(mine.alpha_mean, 4), alpha_static=round(stat.alpha_mean, 4),
                       tau_version=round(mine.tau, 3), tau_static=round(stat.tau, 3), rows=mine.rows)
            totals["alpha_served_versions"] += mine.alpha_mean * mine.rows
            totals["alpha_static"] += stat.alpha_mean * stat.rows
            totals["rows"] += mine.rows
        totals["positions"] += int(acc.size)
        totals["accepted"] += int(acc.sum())
        out["by_version"][version] = row
    if totals["rows"]:
        out["all"] = {"positions": totals["positions"],
                      "served_acceptance": round(totals["accepted"] / max(1, totals["positions"]), 4),
                      "alpha_served_versions": round(totals["alpha_served_versions"] / totals["rows"], 4),
                      "alpha_static": round(totals["alpha_static"] / totals["rows"], 4), "rows": totals["rows"]}
    out["windows"] = shift_windows(records, static, model, ops, static_version)
    held = [r for r in records if is_heldout(base_request_id(r.request_id), worker.trainer.heldout_fraction)]
    latest = registry.current()
    if held and latest and model(latest) is not None:
        a, b = ops.evaluate(model(latest), held), ops.evaluate(static, held)
        out["heldout"] = {"records": len(held), "rows": a.rows, "latest_version": latest,
                          "alpha_latest": round(a.alpha_mean, 4), "alpha_static": round(b.alpha_mean, 4),
                          "tau_latest": round(a.tau, 3), "tau_static": round(b.tau, 3)}
    return out


def _pooled(results) -> tuple[float, float, int]:
    """(alpha_mean, tau, rows) of several EvalResults pooled by their per-position counts."""
    from lkserve.trainer.gate import chain_tau

    k = max(len(r.count_per_position) for r in results)
    num, den = [0.0] * k, [0] * k
    for r in results:
        for n, (a, c) in enumerate(zip(r.alpha_per_position, r.count_per_position)):
            if c:
                num[n] += a * c
                den[n] += c
    rows = sum(r.rows for r in results)
    alpha = sum(r.alpha_mean * r.rows for r in results) / max(1, rows)
    return alpha, chain_tau([x / d if d else float("nan") for x, d in zip(num, den)]), rows


def shift_windows(records, static, model, ops, static_version: str, seconds: float = 120.0) -> list[dict]:
    """The shifted traffic in `seconds`-long windows of capture time from its first record: in each, the versions
    that served it (each on the records it served, all frozen before them) pooled, vs the static draft on the same
    records. `after_swap`: the window holds traffic served by an adapted version (not the static one)."""
    t0 = min(r.timestamp for r in records)
    groups: dict[tuple[int, str], list] = {}
    for r in records:
        groups.setdefault((int((r.timestamp - t0) // seconds), r.draft_version), []).append(r)
    out = []
    for w in sorted({w for w, _ in groups}):
        served, stat = [], []
        for (gw, version), recs in groups.items():
            m = model(version) if gw == w else None
            if m is not None:
                served.append(ops.evaluate(m, recs))
                stat.append(ops.evaluate(static, recs))
        if not served:
            continue
        (a_v, tau_v, rows), (a_s, tau_s, _) = _pooled(served), _pooled(stat)
        versions = sorted({v for gw, v in groups if gw == w})
        out.append({"window": w, "start_s": w * seconds, "rows": rows, "versions": versions,
                    "after_swap": any(v != static_version for v in versions),
                    "alpha_served": round(a_v, 4), "alpha_static": round(a_s, 4),
                    "tau_served": round(tau_v, 3), "tau_static": round(tau_s, 3),
                    "tau_ratio": round(tau_v / tau_s, 3)})
    return out


# -------------------------------------------------------------------------------------------------- traffic
def prompt_streams(seed: int):
    """(MT-bench chat messages, HumanEval completion prompts), each an endless shuffled cycle."""
    from lkserve.prompts import humaneval_prompts, mtbench_prompts

    rng = random.Random(seed)
    mt = [q["turns"][0] for q in mtbench_prompts()]
    he = [p["prompt"] for p in humaneval_prompts()]
    rng.shuffle(mt)
    rng.shuffle(he)
    return itertools.cycle(mt), itertools.cycle(he)


async def client_loop(client, model: str, cfg: DemoConfig, state: DemoState, streams, t0: float, deadline: float,
                      seed: int) -> None:
    mt, he = streams
    for i in itertools.count():
        if time.monotonic() >= deadline:
            return
        start = time.monotonic()
        phase = state.phase
        common = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                  "seed": seed * 100_003 + i, "extra_body": {"lkserve": {"tags": {"domain": phase}}}}
        try:
            if phase == "MT-bench":
                r = await client.chat.completions.create(messages=[{"role": "user", "content": next(mt)}], **common)
            else:
                r = await client.completions.create(prompt=next(he), stop=["\ndef ", "\nclass ", "\nif "], **common)
        except Exception:  # noqa: BLE001 - counted and shown; the demo goes on
            state.errors += 1
            await asyncio.sleep(1)
            continue
        spec = (r.usage.model_extra or {}).get("speculative") or {}
        state.samples.append(Sample(t=time.monotonic() - t0, phase=phase, version=spec.get("draft_version"),
                                    drafts=spec.get("num_drafts", 0), drafted=spec.get("num_draft_tokens", 0),
                                    accepted=spec.get("num_accepted_tokens", 0), tokens=r.usage.completion_tokens,
                                    seconds=time.monotonic() - start))


def parse_worker_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lkserve_worker_heldout_alpha":
                out[f"heldout_alpha_{s.labels['model']}"] = s.value
            elif s.name == "lkserve_worker_heldout_tau":
                out[f"heldout_tau_{s.labels['model']}"] = s.value
            elif s.name in ("lkserve_worker_steps_total", "lkserve_worker_versions_published_total",
                            "lkserve_worker_versions_rejected_total", "lkserve_worker_versions_rolled_back_total",
                            "lkserve_worker_positions_trained_total"):
                out[s.name.removeprefix("lkserve_worker_").removesuffix("_total")] = s.value
    return out


async def watch(gateway: str, worker_metrics: str, state: DemoState, t0: float, deadline: float) -> None:
    """Every second: the served draft version (swap times) and the worker's metrics."""
    last, last_point = None, 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                version = (await http.get(f"{gateway}/ready")).json().get("draft_version")
                if version != last:
                    if last is not None:
                        state.swaps.append({"t": round(time.monotonic() - t0, 1), "version": version})
                    last = version
            with contextlib.suppress(Exception):
                state.worker = parse_worker_metrics((await http.get(worker_metrics)).text)
                point = {k: state.worker.get(k) for k in ("heldout_tau_candidate", "heldout_tau_serving",
                                                          "heldout_alpha_candidate", "heldout_alpha_serving", "steps")}
                if point["heldout_tau_candidate"] is not None and (
                        not state.heldout or any(state.heldout[-1][k] != v for k, v in point.items())):
                    state.heldout.append({"t": round(time.monotonic() - t0, 1), **point})
                if time.monotonic() - last_point >= 10:
                    last_point = time.monotonic()
                    state.worker_series.append({"t": round(last_point - t0, 1),
                                                "positions_trained": state.worker.get("positions_trained"),
                                                "steps": state.worker.get("steps")})
            await asyncio.sleep(1)


# -------------------------------------------------------------------------------------------------- summaries
def by_version(samples: list[Sample]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in samples:
        v = out.setdefault(s.version or "none", {"requests": 0, "drafts": 0, "drafted": 0, "accepted": 0,
                                                  "tokens": 0, "first_t": s.t})
        v["requests"] += 1
        for k in ("drafts", "drafted", "accepted", "tokens"):
            v[k] += getattr(s, k)
    for v in out.values():
        v["acceptance_rate"] = round(v["accepted"] / v["drafted"], 4) if v["drafted"] else None
        v["tau"] = round(1 + v["accepted"] / v["drafts"], 3) if v["drafts"] else None
    return out


def window(samples: list[Sample], t_now: float, seconds: float = 30.0) -> dict:
    recent = [s for s in samples if s.t >= t_now - seconds]
    drafted, accepted, drafts = (sum(getattr(s, k) for s in recent) for k in ("drafted", "accepted", "drafts"))
    return {"tokens_per_s": sum(s.tokens for s in recent) / seconds,
            "acceptance_rate": accepted / drafted if drafted else None,
            "tau": 1 + accepted / drafts if drafts else None}


def render(state: DemoState, cfg: DemoConfig, t0: float, gateway: str):
    from rich.table import Table

    now = time.monotonic() - t0
    w = window(state.samples, now)
    head = Table.grid(padding=(0, 2))
    head.add_row("elapsed", f"{now:5.0f} s / {cfg.minutes * 60:.0f} s", "phase", state.phase,
                 "requests", f"{len(state.samples)} ({state.errors} errors)")
    acc = "-" if w["acceptance_rate"] is None else f"{w['acceptance_rate']:.3f}"
    tau = "-" if w["tau"] is None else f"{w['tau']:.3f}"
    head.add_row("tokens/s (30 s)", f"{w['tokens_per_s']:.1f}", "acceptance (30 s)", acc, "tau (30 s)", tau)
    wk = state.worker
    head.add_row("held-out alpha cand / serving",
                 f"{wk.get('heldout_alpha_candidate', float('nan')):.3f} / {wk.get('heldout_alpha_serving', float('nan')):.3f}",
                 "worker steps", f"{wk.get('steps', 0):.0f}",
                 "published / rejected", f"{wk.get('versions_published', 0):.0f} / {wk.get('versions_rejected', 0):.0f}")
    if state.shift_t is not None:  # the shifted phase: what the static draft and the adapted ones accept there
        shifted = by_version([s for s in state.samples if s.phase == state.phase])
        head.add_row(f"{state.phase} acceptance by version",
                     "  ".join(f"{v} {d['acceptance_rate']:.3f}" for v, d in shifted.items()
                               if d["acceptance_rate"] is not None) or "-",
                     "static draft", cfg.static_version, "", "")
    table = Table(title=f"acceptance by draft version  (dashboard: {gateway}/dashboard)")
    for col in ("version", "requests", "drafted", "accepted", "acceptance", "tau", "since"):
        table.add_column(col, justify="right")
    for v, d in by_version(state.samples).items():
        table.add_row(v, str(d["requests"]), str(d["drafted"]), str(d["accepted"]),
                      "-" if d["acceptance_rate"] is None else f"{d['acceptance_rate']:.3f}",
                      "-" if d["tau"] is None else f"{d['tau']:.3f}", f"{d['first_t']:.0f} s")
    grid = Table.grid()
    grid.add_row(head)
    grid.add_row(table)
    return grid


def plot(state: DemoState, path: Path, bin_seconds: float = 20.0, shift: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max((s.t for s in state.samples), default=0.0)
    centers, rates = [], []
    for lo in range(0, int(end) + 1, int(bin_seconds)):
        chunk = [s for s in state.samples if lo <= s.t < lo + bin_seconds]
        drafted = sum(s.drafted for s in chunk)
        if drafted:
            centers.append(lo + bin_seconds / 2)
            rates.append(sum(s.accepted for s in chunk) / drafted)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(centers, rates, marker="o", lw=1.5, label=f"acceptance rate ({bin_seconds:.0f} s bins)")
    for i, sw in enumerate(state.swaps):
        ax.axvline(sw["t"], color="tab:green", ls=":", lw=1, label="draft swap" if i == 0 else None)
        ax.text(sw["t"], 1.0, f" {sw['version']}", rotation=90, va="top", fontsize=7, color="tab:green",
                transform=ax.get_xaxis_transform())
    if state.shift_t is not None:
        ax.axvline(state.shift_t, color="tab:red", lw=2, label="domain shift: MT-bench -> HumanEval")
    pooled = (shift or {}).get("all") or {}
    if pooled.get("alpha_static") is not None and state.shift_t is not None:
        # another quantity (the gate's alpha per verified position), so another axis
        right = ax.twinx()
        right.hlines(pooled["alpha_static"], state.shift_t, end, colors="tab:gray", linestyles="--",
                     label=f"static {shift['static_version']}: {pooled['alpha_static']:.3f}")
        right.hlines(pooled["alpha_served_versions"], state.shift_t, end, colors="tab:purple", linestyles=":",
                     label=f"versions that served it: {pooled['alpha_served_versions']:.3f}")
        right.set_ylabel("held-out alpha on the shifted traffic (right)")
        right.set_ylim(0, max(pooled["alpha_static"], pooled["alpha_served_versions"]) * 1.6)
        right.legend(loc="upper right", fontsize=8, title="gate alpha after the shift", title_fontsize=8)
    ax.set_xlabel("seconds of traffic")
    ax.set_ylabel("accepted / drafted")
    ax.set_ylim(0, max(rates + [0.1]) * 1.25)
    ax.set_title("lkserve demo: draft acceptance over time")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
async def run_traffic(cfg: DemoConfig, gateway: str, worker_metrics: str, state: DemoState, live) -> None:
    import openai

    async with httpx.AsyncClient(timeout=10) as http:
        model = (await http.get(f"{gateway}/v1/models")).json()["data"][0]["id"]
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="demo", max_retries=0, timeout=300)
    streams = prompt_streams(cfg.seed)
    t0 = state.t0 = time.monotonic()
    duration = cfg.minutes * 60
    deadline = t0 + duration

    async def shift():
        await asyncio.sleep(duration * cfg.shift_at)
        state.phase, state.shift_t = "HumanEval", round(time.monotonic() - t0, 1)

    async def refresh():
        while True:
            live.update(render(state, cfg, t0, gateway))
            await asyncio.sleep(1)

    tasks = [asyncio.ensure_future(x) for x in (shift(), refresh(), watch(gateway, worker_metrics, state, t0, deadline))]
    try:
        await asyncio.gather(*(client_loop(client, model, cfg, state, streams, t0, deadline, seed=c)
                               for c in range(cfg.clients)))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        live.update(render(state, cfg, t0, gateway))
        await client.close()


def wait_ready(url: str, child: Child, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log.name}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{child.name} not ready after {timeout:.0f} s; see {child.log.name}")


def summarize(cfg: DemoConfig, state: DemoState, target: str, draft: str, pids: dict[str, int],
              extra: dict | None = None) -> dict:
    """What summary.json holds: the run's config, acceptance by version and by phase, swaps, the worker's held-out
    curve and its training rate, serving tokens/s, every sample, the pids of what the demo started (its test checks
    none is left), and `extra` (bootstrap, timing, cpu, shift)."""
    traffic_s = max((s.t for s in state.samples), default=0.0)
    trained = state.worker.get("positions_trained")
    phases = {}
    for p in ("MT-bench", "HumanEval"):
        ss = [s for s in state.samples if s.phase == p]
        lo = 0.0 if p == "MT-bench" else (state.shift_t or 0.0)
        hi = (state.shift_t or traffic_s) if p == "MT-bench" else traffic_s
        phases[p] = {"tokens": sum(s.tokens for s in ss),
                     "tokens_per_s": round(sum(s.tokens for s in ss) / (hi - lo), 2) if hi > lo else None}
    return {"config": asdict(cfg), "target": target, "draft": draft, "requests": len(state.samples),
            "errors": state.errors, "domain_shift_t": state.shift_t, "swaps": state.swaps,
            "heldout": state.heldout,
            "by_version": by_version(state.samples), "worker": {
                **state.worker, "positions_per_minute": round(trained / (traffic_s / 60), 1)
                if trained is not None and traffic_s else None, "series": state.worker_series},
            "serving": {"traffic_seconds": round(traffic_s, 1), "tokens": sum(s.tokens for s in state.samples),
                        "tokens_per_s": round(sum(s.tokens for s in state.samples) / traffic_s, 2)
                        if traffic_s else None, "by_phase": phases},
            "by_phase": {p: by_version([s for s in state.samples if s.phase == p]) for p in ("MT-bench", "HumanEval")},
            **(extra or {}),
            "pids": pids,
            "samples": [asdict(s) for s in state.samples]}


def run_demo(cfg: DemoConfig, settings: Settings | None = None) -> dict:
    from rich.console import Console
    from rich.live import Live

    from lkserve.capture.embedded_redis import EmbeddedRedis
    from lkserve.models.prepare import prepare_default_models

    t_start = time.monotonic()
    settings = settings or Settings()
    console = Console()
    out = Path(cfg.out_dir or Path(settings.cache_dir) / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]lkserve demo[/bold]: {cfg.minutes:g} min, {cfg.clients} clients, T={cfg.temperature:g}, "
                  f"draft {cfg.method}; output in {out}")
    target, draft = settings.engine.target_model, settings.engine.draft_model
    if target is None or draft is None:  # LKSERVE_ENGINE__TARGET_MODEL / __DRAFT_MODEL win over the defaults
        console.print("preparing the default models (SmolLM2-135M-Instruct + its draft; ~1 min the first time) ...")
        target_dir, draft_dir = prepare_default_models(settings.cache_dir, method=cfg.method)
        target, draft = target or str(target_dir), draft or str(draft_dir)
    timing = {"models_s": round(time.monotonic() - t_start, 1)}
    port, metrics_port = cfg.port or free_port(), free_port()
    gateway = f"http://127.0.0.1:{port}"
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    children: list[Child] = []
    state = DemoState()
    redis = EmbeddedRedis(out / "redis")
    pids: dict[str, int] = {}
    split = cpu_split(settings.demo.cpu_split)
    extra: dict = {"timing": timing, "cpu": split, "bootstrap": None, "shift": None}
    worker, at_ready = None, {}
    try:
        redis.start()
        pids["redis"] = redis.pid
        cfg.static_version = "base"
        if settings.demo.bootstrap:
            t_boot = time.monotonic()
            boot = demo_bootstrap(settings, target, draft, cfg.method, cfg.seed, redis.url, console)
            timing["bootstrap_s"] = round(time.monotonic() - t_boot, 1)
            extra["bootstrap"] = boot
            draft, cfg.static_version = boot["path"], BOOTSTRAP_VERSION
        env = {**os.environ, "LKSERVE_REDIS__URL": redis.url, "LKSERVE_GATEWAY__PORT": str(port),
               "LKSERVE_GATEWAY__HOST": "127.0.0.1", "LKSERVE_ENGINE__TARGET_MODEL": target,
               "LKSERVE_ENGINE__DRAFT_MODEL": draft, "LKSERVE_ENGINE__METHOD": cfg.method,
               "LKSERVE_TRAINER__BASE_VERSION": cfg.static_version, "LKSERVE_CACHE_DIR": str(settings.cache_dir)}
        if cfg.method == "eagle3":  # the head trains on the target's hidden states: capture them
            env["LKSERVE_CAPTURE__HIDDEN_STATES"] = "true"
        if split["engine_cpus"]:  # the engine core's torch/OpenMP threads: one per CPU it may use
            env["OMP_NUM_THREADS"] = str(len(split["engine_cpus"]))
        worker = worker_settings(settings, redis.url, Path(draft), Path(target), out, metrics_port, cfg.method,
                                 base_version=cfg.static_version,
                                 threads=len(split["worker_cpus"]) if split["worker_cpus"] else None)
        split.update(engine_threads=env.get("OMP_NUM_THREADS", "torch default"), worker_threads=worker.trainer.threads)
        (out / "worker.json").write_text(worker.model_dump_json(indent=2, exclude={"gateway", "demo"}))
        console.print(f"starting the gateway on {gateway} (vLLM, ~30 s) and the worker, draft {cfg.static_version} "
                      f"(CPU: {split['mode']}, engine CPUs {split['engine_cpus'] or 'all'}, worker CPUs "
                      f"{split['worker_cpus'] or 'all'}) ...")
        with pinned(split["engine_cpus"]):
            children.append(Child("gateway", [sys.executable, "-m", "lkserve.cli", "serve"], env,
                                  out / "gateway.log"))
        with pinned(split["worker_cpus"]):
            children.append(Child("worker", [sys.executable, "-m", "lkserve.trainer", "--settings",
                                             str(out / "worker.json")], env, out / "worker.log"))
        pids.update({c.name: c.proc.pid for c in children})
        wait_ready(f"{gateway}/ready", children[0])
        timing["gateway_ready_s"] = round(time.monotonic() - t_start, 1)
        at_ready = {c.name: group_cpu(c.proc.pid)["cpu_seconds"] for c in children}
        console.print(f"[green]ready[/green]. Live dashboard: [bold]{gateway}/dashboard[/bold]   "
                      f"metrics: {gateway}/metrics, {worker_metrics}")
        with Live(console=console, refresh_per_second=2) as live:
            asyncio.run(run_traffic(cfg, gateway, worker_metrics, state, live))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping[/yellow]")
    finally:
        split["processes"] = {c.name: group_cpu(c.proc.pid) for c in children}
        if at_ready:  # CPU seconds of each child while the traffic ran (the start-up's left out)
            split["cpu_seconds_during_traffic"] = {
                name: round(split["processes"][name]["cpu_seconds"] - at_ready[name], 1) for name in at_ready}
        for child in reversed(children):
            child.stop()
        try:
            if worker is not None and state.shift_t is not None and state.samples:
                console.print("comparing the static draft with the adapted versions on the shifted traffic ...")
                with contextlib.suppress(KeyboardInterrupt):
                    extra["shift"] = shift_report(worker, cfg.static_version)
        finally:
            redis.stop()
    if state.t0 is not None and state.samples:
        timing["first_response_s"] = round(state.t0 - t_start + min(s.t for s in state.samples), 1)
    summary = summarize(cfg, state, target, draft, pids, extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if state.samples:
        plot(state, out / "acceptance.png", shift=extra["shift"])
    shift = (extra["shift"] or {}).get("all")
    if shift:
        console.print(f"{cfg.static_version} kept static vs the adapted versions on the {extra['shift']['phase']} "
                      f"traffic (held-out alpha, same {shift['rows']} positions): {shift['alpha_static']:.3f} vs "
                      f"{shift['alpha_served_versions']:.3f}")
    console.print(f"summary: {out / 'summary.json'}" + (f"\nplot:    {out / 'acceptance.png'}" if state.samples else ""))
    return summary
