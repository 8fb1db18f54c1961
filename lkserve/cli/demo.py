"""`lkserve demo`: the whole loop on one machine, watched live.

embedded redis-server  <-  gateway (`lkserve serve`: vLLM + the SmolLM2 target + its draft, capture on)
                       <-  worker  (`python -m lkserve.trainer`: LK-lambda training, gate, publish)
traffic: several concurrent clients (the official `openai` client) send MT-bench questions, then HumanEval stubs
(a domain shift), at T=1. Every response's usage says which draft version served it and what it accepted, so the
acceptance by version over time comes from the API itself. At the end: summary.json and acceptance.png.

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


def worker_settings(settings: Settings, redis_url: str, draft_dir: Path, target_dir: Path, out: Path,
                    metrics_port: int, method: str) -> Settings:
    """The worker's Settings, tuned for a short CPU demo: small steps, frequent held-out evaluation. An EAGLE-3 head's
    records carry the target's hidden states (~1 MB per SmolLM2 request), so it keeps fewer of them in memory."""
    per_method = {"reservoir_records": 192, "heldout_records": 48} if method == "eagle3" else {}
    trainer = settings.trainer.model_copy(update={
        "consumer": "demo-worker", "batch_positions": 512, "min_fresh_positions": 256, "warmup_steps": 8,
        "eval_every_steps": 4, "gate_min_rows": 128, "checkpoint_every_steps": 20, "metrics_port": metrics_port,
        "public_url": f"http://127.0.0.1:{metrics_port}", **per_method})
    engine = settings.engine.model_copy(update={"method": method, "draft_model": str(draft_dir),
                                                "target_model": str(target_dir)})
    return settings.model_copy(update={"cache_dir": out / "worker", "engine": engine, "trainer": trainer,
                                       "redis": settings.redis.model_copy(update={"url": redis_url})})


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
    last = None
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


def plot(state: DemoState, path: Path, bin_seconds: float = 20.0) -> None:
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
    t0 = time.monotonic()
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


def summarize(cfg: DemoConfig, state: DemoState, target: str, draft: str, pids: dict[str, int]) -> dict:
    """What summary.json holds: the run's config, acceptance by version and by phase, swaps, the worker's held-out
    curve, every sample, and the pids of what the demo started (its test checks none is left)."""
    return {"config": asdict(cfg), "target": target, "draft": draft, "requests": len(state.samples),
            "errors": state.errors, "domain_shift_t": state.shift_t, "swaps": state.swaps,
            "heldout": state.heldout,
            "by_version": by_version(state.samples), "worker": state.worker,
            "by_phase": {p: by_version([s for s in state.samples if s.phase == p]) for p in ("MT-bench", "HumanEval")},
            "pids": pids,
            "samples": [asdict(s) for s in state.samples]}


def run_demo(cfg: DemoConfig, settings: Settings | None = None) -> dict:
    from rich.console import Console
    from rich.live import Live

    from lkserve.capture.embedded_redis import EmbeddedRedis
    from lkserve.models.prepare import prepare_default_models

    settings = settings or Settings()
    console = Console()
    out = Path(cfg.out_dir or Path(settings.cache_dir) / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]lkserve demo[/bold]: {cfg.minutes:g} min, {cfg.clients} clients, T={cfg.temperature:g}, "
                  f"draft {cfg.method}; output in {out}")
    console.print("preparing the default models (SmolLM2-135M-Instruct + its draft; ~1 min the first time) ...")
    target_dir, draft_dir = prepare_default_models(settings.cache_dir, method=cfg.method)
    target = settings.engine.target_model or str(target_dir)
    draft = settings.engine.draft_model or str(draft_dir)
    port, metrics_port = cfg.port or free_port(), free_port()
    gateway = f"http://127.0.0.1:{port}"
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    children: list[Child] = []
    state = DemoState()
    redis = EmbeddedRedis(out / "redis")
    pids: dict[str, int] = {}
    try:
        redis.start()
        pids["redis"] = redis.pid
        env = {**os.environ, "LKSERVE_REDIS__URL": redis.url, "LKSERVE_GATEWAY__PORT": str(port),
               "LKSERVE_GATEWAY__HOST": "127.0.0.1", "LKSERVE_ENGINE__TARGET_MODEL": target,
               "LKSERVE_ENGINE__DRAFT_MODEL": draft, "LKSERVE_ENGINE__METHOD": cfg.method,
               "LKSERVE_CACHE_DIR": str(settings.cache_dir)}
        if cfg.method == "eagle3":  # the head trains on the target's hidden states: capture them
            env["LKSERVE_CAPTURE__HIDDEN_STATES"] = "true"
        worker = worker_settings(settings, redis.url, Path(draft), Path(target), out, metrics_port, cfg.method)
        (out / "worker.json").write_text(worker.model_dump_json(indent=2, exclude={"gateway"}))
        console.print(f"starting the gateway on {gateway} (vLLM, ~30 s) and the worker ...")
        children.append(Child("gateway", [sys.executable, "-m", "lkserve.cli", "serve"], env, out / "gateway.log"))
        children.append(Child("worker", [sys.executable, "-m", "lkserve.trainer", "--settings",
                                         str(out / "worker.json")], env, out / "worker.log"))
        pids.update({c.name: c.proc.pid for c in children})
        wait_ready(f"{gateway}/ready", children[0])
        console.print(f"[green]ready[/green]. Live dashboard: [bold]{gateway}/dashboard[/bold]   "
                      f"metrics: {gateway}/metrics, {worker_metrics}")
        with Live(console=console, refresh_per_second=2) as live:
            asyncio.run(run_traffic(cfg, gateway, worker_metrics, state, live))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping[/yellow]")
    finally:
        for child in reversed(children):
            child.stop()
        redis.stop()
    summary = summarize(cfg, state, target, draft, pids)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if state.samples:
        plot(state, out / "acceptance.png")
    console.print(f"summary: {out / 'summary.json'}" + (f"\nplot:    {out / 'acceptance.png'}" if state.samples else ""))
    return summary
