"""All of lkserve's settings, in one place.

Every field can be set by an environment variable: `LKSERVE_<SECTION>__<FIELD>` (e.g.
`LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS=6`, `LKSERVE_REDIS__URL=redis://host:6379/0`), or top-level
`LKSERVE_CACHE_DIR`; or in a file named by `LKSERVE_CONFIG` (or `lkserve --config FILE`): TOML, JSON or YAML with
the same nesting (`[engine]` / `num_speculative_tokens = 6`). Precedence: CLI flags > environment > file > defaults.
Sections are plain pydantic models so code can build them directly in tests.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)


def default_cache_dir() -> Path:
    """Models, embedded Redis data and draft versions live here: LKSERVE_CACHE_DIR, else $XDG_CACHE_HOME/lkserve.
    (Read here too, not only by Settings, so code that has no Settings at hand agrees with code that has.)"""
    if os.environ.get("LKSERVE_CACHE_DIR"):
        return Path(os.environ["LKSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lkserve"


# K by measurement where it was measured (docs/engine.md "Choosing K"). CPU: bench/results/k_sweep.json, bootstrapped
# drafts, held-out prompts, 1 stream, T=0, this 2-core machine: fastest K for the EAGLE-3 head 2 (1.12x no
# speculation; K=4 0.97x), for ngram 4 (1.35x), for the draft model 1 (0.96x) with K=2 within noise of it (0.94x)
# and twice the draft positions per step for the worker to learn from. A verified token costs the CPU about what a
# plain step does, so K stays small. CUDA: not measured here; 4 (verifying a few more tokens is nearly free on a GPU).
DEFAULT_K: dict[str, dict[str, int]] = {
    "cpu": {"draft_model": 2, "eagle3": 2, "ngram": 4},
    "cuda": {"draft_model": 4, "eagle3": 4, "ngram": 4},
}


def device_kind() -> str:
    """Where vLLM will run: "cuda" when torch sees a GPU, else "cpu" (torch is imported only to ask)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EngineSettings(BaseModel):
    """How vLLM is started: target, draft and speculative decoding."""

    target_model: str | None = Field(None, description="HF checkpoint dir of the target; None = default SmolLM2")
    draft_model: str | None = Field(None, description="HF checkpoint dir of the draft; None = default draft")
    method: Literal["draft_model", "ngram", "eagle3", "none"] = "draft_model"
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=16, description="K, tokens drafted per step; None: DEFAULT_K for the device and method")
    # probabilistic + standard rejection sampling: acceptance = sum min(p, q), what LK losses optimise.
    draft_sample_method: Literal["probabilistic", "greedy"] = "probabilistic"
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU (whole GiB)")
    enforce_eager: bool = True
    # in_process: vLLM's worker runs inside its engine-core process (uniproc executor); multiprocess: the worker is a
    # process of its own that the engine core drives over a shared-memory queue (vLLM's default, and what tensor
    # parallelism needs). Either way the engine core is a child process of lkserve's. On this 2-core CPU, through
    # the gateway, in_process served 1.14-1.25x the tokens/s at 4 streams, 1.05-1.19x at 1 stream; while serving, the
    # multiprocess engine core spins on a core of its own waiting for the worker (docs/engine.md, bench/layout.py).
    layout: Literal["in_process", "multiprocess"] = Field(
        "in_process", description="where vLLM's worker runs: inside the engine-core process or a process of its own")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans; > 1 needs layout=multiprocess")
    seed: int = 0
    # K by measurement (lkserve/engine/spec_k.py, docs/engine.md "Choosing K"): the gateway exports the K that
    # maximises E[tokens | K] / cost(K) from the last `k_window_steps` steps' acceptance per position
    # (lkserve_spec_recommended_k); adaptive_k applies it, capped at num_speculative_tokens, at each draft swap and
    # every k_interval_steps verification steps in between.
    adaptive_k: bool = Field(False, description="apply the recommended K (<= num_speculative_tokens) at each "
                             "draft swap and every k_interval_steps steps")
    k_interval_steps: int = Field(250, ge=1, description="verification steps between two adaptive_k decisions")
    k_window_steps: int = Field(2000, ge=1, description="recent verification steps the recommended K reads")
    k_min_drafted: int = Field(50, ge=1, description="drafts a position needs before its acceptance counts")
    k_decay: float = Field(1.0, ge=0.0, le=1.0, description="alpha beyond the measured positions: the last "
                           "measured one times this per extra position")
    # cost(K): the prior below until the engine has timed its own steps at a K (k_cost_online); k_probe then
    # serves a neighbouring K the engine has no recent time for during one interval, so the best K is measured.
    step_cost_ms: dict[str, float] | None = Field(
        None, description="{c0, c_draft, c_verify} per-step ms; None: spec_k.DEFAULT_COST_MS for the method")
    step_cost_file: Path | None = Field(None, description="a bench/step_cost.py JSON: its 1-stream figures "
                                        "for the method win over step_cost_ms")
    k_cost_online: bool = Field(True, description="adaptive_k prices K by the engine's own measured step "
                                "times where it has them (the prior elsewhere)")
    k_probe: bool = Field(True, description="adaptive_k serves an unmeasured neighbouring K for one interval")
    k_cost_min_steps: int = Field(20, ge=1, description="decode-only steps a K needs before its time counts")
    k_cost_max_age_s: float = Field(600.0, gt=0, description="step times older than this are forgotten")
    k_move_sigmas: float = Field(2.0, ge=0, description="adaptive_k leaves the serving K for another measured K only "
                                 "when the expected gain exceeds this many standard errors of their costs (0: always)")

    @model_validator(mode="after")
    def _measured_k(self) -> EngineSettings:
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_K[device_kind()].get(self.method, 4)
        return self

    @model_validator(mode="after")
    def _layout_fits_parallelism(self) -> EngineSettings:
        if self.tensor_parallel_size > 1 and self.layout == "in_process":
            raise ValueError("engine.layout=in_process runs one worker: tensor_parallel_size > 1 needs "
                             "engine.layout=multiprocess")
        return self


class CaptureSettings(BaseModel):
    """What the engine records at verification time (see README: what is stored)."""

    enabled: bool = True
    sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of requests captured")
    top_k: int = Field(32, ge=1, le=1024, description="target tokens kept per drafted position")
    queue_size: int = Field(4096, ge=1, description="records buffered in memory before dropping")
    max_positions_per_record: int = Field(512, ge=1, description="long requests are split into chunks")
    max_tracked_requests: int = Field(4096, ge=1, description="requests a worker accumulates at once; more are "
                                      "not captured")
    max_queue_bytes: int = Field(64 << 20, ge=1, description="writer queue cap in bytes, besides queue_size")
    # EAGLE-3 engines only: also record what the head consumes, the target's aux hidden states ([n_aux * H] per
    # context position; 3456 B at H=576, 24576 B at H=4096 in bf16), for `hidden_context` positions before each
    # record's first drafted position. Off by default: records grow ~20-100x (docs/eagle3.md).
    hidden_states: bool = Field(False, description="capture the target's aux hidden states (EAGLE-3 training)")
    hidden_dtype: Literal["bf16", "fp16"] = "bf16"
    hidden_context: int = Field(1024, ge=0, description="prefix positions of hidden states kept per record")

    def for_engine(self, method: str) -> CaptureSettings:
        """What an engine of `method` applies: hidden states exist only for EAGLE-3."""
        return self.model_copy(update={"hidden_states": self.hidden_states and method == "eagle3"})


class RedisSettings(BaseModel):
    """Where capture records and draft versions go. No URL = an embedded private redis-server."""

    url: str | None = None
    stream: str = "lkserve:capture"
    # A record is ~3.6 KB for a short request (16 positions, 512 context tokens) and up to ~75 KB for a full
    # 512-position chunk: 20k records are 70 MB .. 1.5 GB of Redis memory (docs/capture.md has the formula).
    stream_maxlen: int = Field(20_000, ge=1, description="approximate cap on records kept (XADD MAXLEN ~)")
    retention_seconds: int | None = Field(None, ge=1, description="drop records older than this (XTRIM MINID)")
    key_prefix: str = "lkserve"
    embedded_maxmemory: str | None = Field(None, description="maxmemory of the embedded redis-server, e.g. 2gb")
    embedded_persistence: Literal["none", "aof", "rdb"] = "none"


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = Field(default_factory=list, description="empty = open (a warning is logged)")
    admin_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 64
    shutdown_grace_s: float = Field(5.0, ge=0, le=20, description="on SIGTERM/SIGINT, requests still running "
                                    "after this long are aborted (503, or an error event in a stream)")


DEFAULT_LR = {"draft_model": 3e-3, "eagle3": 1e-3}


def default_consumer() -> str:
    return f"{socket.gethostname()}-worker"


class TrainerSettings(BaseModel):
    """The adaptation worker (`lkserve worker`). What it trains is the engine's: `engine.method` / `draft_model` /
    `target_model`, K = `engine.num_speculative_tokens`, context = `engine.max_model_len`; where: `redis`, `cache_dir`."""

    loss: Literal["lk_lambda", "lk_alpha", "kl", "tv"] = "lk_lambda"
    eta: float = 3.0
    gamma: float = 0.8
    # None: 3e-3 for a draft model, 1e-3 for an EAGLE-3 head (a new SmolLM2 head on 10,879 captured positions:
    # held-out alpha 0.093 after 40 steps at 1e-3, 0.075 at 3e-3; docs/eagle3.md)
    lr: float | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: int = Field(100_000, ge=1, description="length of the cosine schedule")
    batch_positions: int = Field(1024, ge=1, description="fresh positions per optimizer step")
    min_fresh_positions: int | None = Field(None, ge=1, description="train once this many wait; None: half a batch")
    grad_clip: float = 1.0
    threads: int = 1
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="matmuls of the training forward/backward: fp32, or bf16 autocast (fp32 master weights, "
        "optimizer and losses; 1.8-1.9x the fp32 positions/s on an AVX512-BF16 CPU, loss within ~3e-4 relative: "
        "bench/train_speed.py). Held-out evaluation is always fp32")
    # The offline bootstrap (`lkserve draft bootstrap`, the demo's) has the CPU to itself: nothing serves beside it.
    bootstrap_threads: int | None = Field(
        None, ge=1, description="torch threads of the offline bootstrap's teacher pass and training; None: every CPU "
        "this process may use (the online worker keeps `threads`: it shares the CPU with serving)")
    bootstrap_eval_positions: int | None = Field(
        4096, ge=1, description="held-out positions of the bootstrap's evaluations during training (every "
        "eval_every_steps; a strided sample of the records; None: all): the full held-out split only before and "
        "after, where the result is reported")
    bootstrap_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`precision` of the offline bootstrap's training; auto: bf16 where the CPU multiplies "
        "bf16 natively (AVX512-BF16 or AMX: 1.9x fp32's positions/s on 2 threads, bench/train_speed.py), else fp32")
    train_params: Literal["layers", "layers+head", "all"] = Field(
        "layers", description="what of a draft model trains (an EAGLE-3 head trains all of its own weights)")
    seed: int = 0
    # replay / held-out
    heldout_fraction: float = Field(0.1, ge=0.0, le=1.0, description="requests kept out of training, by request id")
    heldout_records: int = Field(256, ge=1)
    reservoir_records: int = Field(2048, ge=0)
    replay_ratio: float = Field(0.25, ge=0.0, description="replayed positions per fresh position in a batch")
    # gate / publish
    base_version: str = Field("base", description="registry name of the checkpoint the engines start with")
    eval_every_steps: int = Field(20, ge=1)
    gate_margin: float = 0.005
    gate_metric: Literal["alpha_mean", "tau"] = "alpha_mean"
    gate_min_rows: int = Field(256, ge=1)
    # teacher forcing of served contexts: the worker runs the target (transformers, on its own threads) over each
    # captured record's context and trains on a label at EVERY position (prompt and completion), not only where
    # the draft was verified (about one per target step): several times the positions per served token, the
    # prompts' domain included. Needs engine.target_model. The rollback monitor still reads the served records.
    teacher_forcing: bool = Field(False, description="label every position of served contexts with the target "
                                  "(a target pass per record on the worker)")
    # rollback
    rollback_window_tokens: int = Field(2000, ge=1)
    rollback_margin: float = 0.05
    # stream and crash safety
    consumer_group: str = "lkserve-trainers"
    consumer: str = Field(default_factory=default_consumer,
                          description="stable across restarts: own pending entries are found by name")
    state_dir: Path | None = Field(None, description="training state; None: <cache_dir>/worker/<consumer>")
    read_count: int = Field(64, ge=1)
    block_ms: int = Field(500, ge=0)
    checkpoint_every_steps: int = Field(10, ge=1)
    checkpoint_every_seconds: float = 30.0
    claim_min_idle_ms: int = Field(60_000, ge=0, description="pending records of a silent worker are reclaimed after")
    keep_ledger: bool = Field(False, description="keep every trained entry id in the state (tests, audits)")
    exit_when_drained: bool = Field(False, description="stop once the stream has nothing new (tests, batch jobs)")
    max_steps: int | None = Field(None, description="stop after this many optimizer steps")
    step_delay: float = Field(0.0, description="sleep after each step (tests: widens a crash window)")
    # HTTP
    metrics_port: int | None = Field(9100, description="worker HTTP port: /metrics and published checkpoints")
    public_url: str | None = Field(None, description="how gateways reach that port (http://worker:9100): "
                                   "announcements then carry a URL and gateways need no shared filesystem")

    def lr_for(self, method: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(method, DEFAULT_LR["draft_model"])

    def fresh_threshold(self) -> int:
        return self.min_fresh_positions if self.min_fresh_positions is not None else max(1, self.batch_positions // 2)


class DemoSettings(BaseModel):
    """`lkserve demo` (LKSERVE_DEMO__*; the demo's flags win). The draft it starts from, and how it shares the CPU."""

    # The demo starts from a draft bootstrapped (lkserve.trainer.bootstrap.run_bootstrap) on the CHAT domain only
    # (MT-bench train split), so its HumanEval phase is a domain shift the draft has never seen. Cached under
    # <cache>/demo/bootstrap/<method>-<key>, key = target, base draft, method and everything below: a later demo with
    # the same values reuses it. Budget measured on this 2-core CPU (docs/worker.md, "The demo's bootstrap").
    bootstrap: bool = Field(True, description="start from a bootstrapped draft (False: the untrained one)")
    bootstrap_prompts: int | None = Field(None, ge=2, description="MT-bench prompts in all, held-out split "
                                          "included (None: all 80: 64 train, 16 held out)")
    bootstrap_samples: int = Field(2, ge=1, description="the target's completions per train prompt")
    bootstrap_max_tokens: int = Field(128, ge=8, description="tokens per completion")
    bootstrap_positions: int = Field(60_000, ge=1, description="training budget: positions trained")
    bootstrap_minutes: float | None = Field(6.0, gt=0, description="training budget cap: minutes of training")
    # worker_core: the training worker is pinned to a CPU of its own (the last half of the CPUs, at least one) with
    # that many torch threads, the gateway and its vLLM engine core to the others with OMP_NUM_THREADS = their count;
    # shared: no pinning, the engine core on torch's default threads (all CPUs), as before. Measured side by side on
    # this 2-core machine: docs/worker.md, "The worker's share of the demo".
    cpu_split: Literal["worker_core", "shared"] = "worker_core"
    teacher_forcing: bool = Field(True, description="the demo's worker labels every position of the served "
                                  "contexts with the target (trainer.teacher_forcing)")
    worker_lr: float | None = Field(None, gt=0, description="the demo worker's learning rate (None: a tenth of "
                                    "trainer.lr from a bootstrapped draft, trainer.lr from the untrained one); the "
                                    "bootstrap keeps trainer.lr")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LKSERVE_", env_nested_delimiter="__", extra="ignore")

    cache_dir: Path = Field(default_factory=default_cache_dir)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        path = os.environ.get("LKSERVE_CONFIG")
        if path:
            sources.append(config_file_source(settings_cls, Path(path)))
        return tuple(sources)


def config_file_source(settings_cls, path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"LKSERVE_CONFIG: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"LKSERVE_CONFIG: {path} is not .toml, .json, .yaml or .yml")


def load_settings(**overrides) -> Settings:
    """Environment first, then explicit overrides (e.g. from CLI flags)."""
    return Settings(**overrides)
