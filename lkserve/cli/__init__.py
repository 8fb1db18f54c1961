"""The `lkserve` command. One subcommand per job; each is a thin call into the package."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lkserve.config import load_settings


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(load_settings().model_dump(mode="json"), indent=2))
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from lkserve.models.prepare import prepare_default_models

    settings = load_settings()
    target_dir, draft_dir = prepare_default_models(settings.cache_dir, method=settings.engine.method)
    print(json.dumps({"target": str(target_dir), "draft": str(draft_dir), "method": settings.engine.method}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lkserve.gateway.server import serve

    overrides = {}
    if args.host or args.port:
        gw = load_settings().gateway
        overrides["gateway"] = gw.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    serve(load_settings(**overrides))
    return 0


def _serve_redis(settings, what: str):
    """`settings` with redis.url set: LKSERVE_REDIS__URL, else the embedded Redis of a `lkserve serve` running
    under the same cache dir (the URL file it writes); SystemExit saying why when there is neither."""
    if settings.redis.url:
        return settings
    from lkserve.capture.embedded_redis import discover_url

    url, why = discover_url(settings.cache_dir)
    if url is None:
        raise SystemExit(f"{what} needs the Redis the gateway writes to: {why}. Start `lkserve serve` first (same "
                         "LKSERVE_CACHE_DIR), or set LKSERVE_REDIS__URL.")
    print(f"lkserve: using {why}", file=sys.stderr)
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})


def cmd_worker(args: argparse.Namespace) -> int:
    from lkserve.trainer.worker import run_worker

    run_worker(_serve_redis(load_settings(), "lkserve worker"))
    return 0


def _registry():
    from lkserve.drafts import DraftRegistry

    settings = _serve_redis(load_settings(), "lkserve draft")
    return DraftRegistry(settings.redis.url, settings.redis.key_prefix)


def cmd_draft_list(args: argparse.Namespace) -> int:
    reg = _registry()
    print(json.dumps({"current": reg.current(), "previous": reg.previous(), "versions": reg.versions(),
                      "history": reg.history()}, indent=2, default=str))
    return 0


def cmd_draft_promote(args: argparse.Namespace) -> int:
    print(json.dumps(_registry().announce(args.version, reason="cli promote"), default=str))
    return 0


def cmd_draft_rollback(args: argparse.Namespace) -> int:
    print(json.dumps(_registry().rollback(args.to, reason="cli rollback"), default=str))
    return 0


def cmd_draft_bootstrap(args: argparse.Namespace) -> int:
    """Offline phase of the worker: capture the target's own generations, train, register (and announce)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON result (vLLM: stdout)
    from lkserve.capture.embedded_redis import discover_url, resolve_redis_url
    from lkserve.drafts import DraftRegistry
    from lkserve.models.prepare import prepare_default_models
    from lkserve.trainer.bootstrap import default_state_dir, run_bootstrap

    if args.positions is None and args.minutes is None:
        raise SystemExit("lkserve draft bootstrap needs a budget: --minutes and/or --positions")
    settings = load_settings()
    engine = settings.engine
    if engine.target_model is None or engine.draft_model is None:  # the defaults `lkserve serve` would start
        target, draft = prepare_default_models(settings.cache_dir, method=engine.method)
        engine = engine.model_copy(update={"target_model": engine.target_model or str(target),
                                           "draft_model": engine.draft_model or str(draft)})
    url = settings.redis.url or discover_url(settings.cache_dir)[0]
    handle = None
    if url is None:  # the embedded Redis `lkserve serve` will start under the same cache dir
        url, handle = resolve_redis_url(settings)
    settings = settings.model_copy(update={"engine": engine, "redis": settings.redis.model_copy(update={"url": url})})
    state_dir = args.state_dir or default_state_dir(settings, args.seed)
    try:
        res = run_bootstrap(settings, DraftRegistry(url, settings.redis.key_prefix), max_positions=args.positions,
                            max_minutes=args.minutes, seed=args.seed, announce=not args.no_announce,
                            state_dir=state_dir, fresh=args.fresh, source=args.source,
                            max_prompts=args.prompts, max_tokens=args.max_tokens, temperature=args.temperature,
                            concurrency=args.concurrency, domains=tuple(args.domains.split(",")),
                            # greedy only when asked: the state's capture metadata of earlier runs stays valid
                            **({"samples": args.samples, "text_tokens": args.text_tokens,
                                **({"greedy": True} if args.greedy else {}),
                                **({"labels": args.labels} if args.labels != "all" else {})}
                               if args.source == "teacher" else {}))
    finally:
        if handle is not None:
            handle.stop()
    print(json.dumps({"version": res.version, "heldout_before": res.before, "heldout_after": res.after,
                      "heldout_completion_after": res.after_completion,
                      "steps": res.steps, "positions_trained": res.positions_trained,
                      "resumed_from_step": res.resumed_step, "resumed_from_positions": res.resumed_positions,
                      "draft_vocab": res.vocab, "state_dir": str(state_dir),
                      "train_records": res.train_records, "heldout_records": res.heldout_records,
                      "generate_seconds": round(res.generate_seconds, 1),
                      "train_seconds": round(res.train_seconds, 1)}, indent=2))
    return 0


BENCHES = ("losses", "capture", "engine", "models", "adaptation", "domain_shift", "serving", "draft_choice",
           "eagle3_losses", "lk_vs_kl_tiny", "loss_cost", "step_cost", "k_sweep", "bootstrap_sources", "bootstrap",
           "train_speed", "bootstrap_losses", "compile", "adapted")


def cmd_bench(args: argparse.Namespace) -> int:
    """The scripts live in the repository's bench/ (they are measurements, not library code)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.name}.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: `lkserve bench` runs from a clone of the repository")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def cmd_demo(args: argparse.Namespace) -> int:
    from lkserve.cli.demo import DemoConfig, run_demo

    settings = load_settings()
    flags = {"bootstrap": False if args.no_bootstrap else None, "bootstrap_positions": args.boot_positions,
             "bootstrap_minutes": args.boot_minutes, "bootstrap_prompts": args.boot_prompts,
             "bootstrap_samples": args.boot_samples, "bootstrap_max_tokens": args.boot_max_tokens,
             "cpu_split": args.cpu_split}
    demo = settings.demo.model_copy(update={k: v for k, v in flags.items() if v is not None})
    summary = run_demo(DemoConfig(minutes=args.minutes, clients=args.clients, temperature=args.temperature,
                                  max_tokens=args.max_tokens, port=args.port, seed=args.seed, out_dir=args.out,
                                  method=args.draft, shift_at=args.shift_at), settings.model_copy(update={"demo": demo}))
    return 0 if summary["requests"] else 1


def build_parser() -> argparse.ArgumentParser:
    from lkserve.cli.demo import DEFAULT_METHOD

    parser = argparse.ArgumentParser(prog="lkserve", description=__doc__)
    parser.add_argument("--config", metavar="FILE",
                        help="settings file (TOML, JSON or YAML; same as LKSERVE_CONFIG). Env vars and flags win.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("show", help="print the effective configuration as JSON").set_defaults(
        func=cmd_config_show
    )

    models = sub.add_parser("models", help="prepare the default target and draft checkpoints")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("prepare", help="convert SmolLM2 from its GGUF and derive the draft").set_defaults(
        func=cmd_models_prepare
    )

    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway with the engine (and embedded Redis)")
    serve.add_argument("--host", help="bind address (LKSERVE_GATEWAY__HOST)")
    serve.add_argument("--port", type=int, help="port (LKSERVE_GATEWAY__PORT)")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("worker", help="run the adaptation worker (on LKSERVE_REDIS__URL, else on the embedded Redis "
                                  "of a running `lkserve serve`)").set_defaults(func=cmd_worker)

    draft = sub.add_parser("draft", help="inspect and move the served draft version (Redis found as for `worker`)")
    draft_sub = draft.add_subparsers(dest="draft_command", required=True)
    draft_sub.add_parser("list", help="versions, current, history").set_defaults(func=cmd_draft_list)
    promote = draft_sub.add_parser("promote", help="announce a registered version to every gateway")
    promote.add_argument("version")
    promote.set_defaults(func=cmd_draft_promote)
    rollback = draft_sub.add_parser("rollback", help="back to the previous (or a named) version")
    rollback.add_argument("--to", help="version to roll back to (default: the previous one)")
    rollback.set_defaults(func=cmd_draft_rollback)

    boot = draft_sub.add_parser("bootstrap", help="train the draft offline on the target's own generations (MT-bench "
                                                  "+ HumanEval prompts, held-out split), register it as a version")
    boot.add_argument("--minutes", type=float, help="training budget: minutes of training in THIS run (a resumed "
                                                    "run trains this long again)")
    boot.add_argument("--positions", type=int, help="training budget: positions trained in total, counting the "
                                                    "runs this one resumes")
    boot.add_argument("--state-dir", help="where the captured records and the training state are kept; rerunning "
                                          "the same command resumes from it (default <cache>/bootstrap/"
                                          "<method>-<seed>)")
    boot.add_argument("--fresh", action="store_true", help="discard the state directory first (capture again, train "
                                                           "from the base)")
    boot.add_argument("--prompts", type=int, help="use only this many prompts (default: all of --domains; 244)")
    boot.add_argument("--domains", default="mtbench,humaneval",
                      help="prompt sets, comma-separated: mtbench (chat), humaneval (code); default both")
    boot.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    boot.add_argument("--temperature", type=float, default=1.0)
    boot.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    boot.add_argument("--seed", type=int, default=0)
    boot.add_argument("--no-announce", action="store_true", help="register only; do not make it current")
    boot.add_argument("--source", choices=("teacher", "served"), default="teacher",
                      help="teacher: the target's own completions (no speculation, many streams), then a teacher-forced "
                           "target pass labelling every position (default: more held-out acceptance per CPU-minute, "
                           "bench/bootstrap_sources.py); served: what a spec-decoding engine's capture records")
    boot.add_argument("--samples", type=int, default=1, help="teacher: completions per train prompt")
    boot.add_argument("--greedy", action="store_true",
                      help="teacher: add the greedy (T=0) completion of every train prompt to the --samples ones")
    boot.add_argument("--labels", choices=("all", "completion"), default="all",
                      help="teacher: which positions are labels, train and held-out: all (prompt included) or "
                           "completion (only the completions, the text serving drafts)")
    boot.add_argument("--text-tokens", type=int, default=0,
                      help="teacher: add this many tokens of installed packages' text and code to the train data")
    boot.set_defaults(func=cmd_draft_bootstrap)

    bench = sub.add_parser("bench", help="run a benchmark script from bench/ (prints JSON)")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --help)")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the whole loop on this machine: embedded Redis, gateway, worker, traffic")
    demo.add_argument("--minutes", type=float, default=10.0, help="length of the traffic (default 10)")
    demo.add_argument("--clients", type=int, default=3, help="concurrent clients (default 3)")
    demo.add_argument("--shift-at", type=float, default=0.5,
                      help="fraction of the traffic after which it shifts from MT-bench to HumanEval (default 0.5)")
    demo.add_argument("--temperature", type=float, default=1.0)
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="output directory (default <cache>/demo/<time>)")
    demo.add_argument("--draft", choices=("draft_model", "eagle3"), default=DEFAULT_METHOD,
                      help=f"the draft to adapt: a 2-layer SmolLM2 draft model or a new EAGLE-3 head "
                           f"(default {DEFAULT_METHOD}, chosen by measurement: README, 'Which draft')")
    demo.add_argument("--no-bootstrap", action="store_true",
                      help="start from the untrained draft (LKSERVE_DEMO__BOOTSTRAP=false) instead of one bootstrapped "
                           "on the chat domain (cached after the first run)")
    demo.add_argument("--boot-positions", type=int, help="bootstrap budget: positions trained "
                                                          "(LKSERVE_DEMO__BOOTSTRAP_POSITIONS, default 60000)")
    demo.add_argument("--boot-minutes", type=float, help="bootstrap budget cap: minutes of training (default 6)")
    demo.add_argument("--boot-prompts", type=int, help="bootstrap MT-bench prompts, held-out ones included "
                                                        "(default all 80)")
    demo.add_argument("--boot-samples", type=int, help="bootstrap completions per train prompt (default 2)")
    demo.add_argument("--boot-max-tokens", type=int, help="bootstrap tokens per completion (default 128)")
    demo.add_argument("--cpu-split", choices=("worker_core", "shared"),
                      help="worker_core (default): the training worker on a CPU of its own, the engine on the others; "
                           "shared: no pinning (LKSERVE_DEMO__CPU_SPLIT)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:  # through the environment, so the processes the demo starts read it too
        os.environ["LKSERVE_CONFIG"] = os.path.abspath(args.config)
    return args.func(args)

