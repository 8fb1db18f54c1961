"""The `lkserve` command. One subcommand per job; each is a thin call into the package."""

from __future__ import annotations

import argparse
import json

from lkserve.config import load_settings


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(load_settings().model_dump(mode="json"), indent=2))
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from lkserve.models.prepare import prepare_default_models

    target_dir, draft_dir = prepare_default_models(load_settings().cache_dir)
    print(json.dumps({"target": str(target_dir), "draft": str(draft_dir)}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print("lkserve demo: not implemented yet (the demo issue wires gateway + worker + traffic).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkserve", description=__doc__)
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

    sub.add_parser("demo", help="run the end-to-end demo").set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

