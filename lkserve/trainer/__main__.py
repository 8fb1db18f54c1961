"""`python -m lkserve.trainer [--config worker.json]`: run the adaptation worker.

With --config, the JSON holds WorkerConfig fields; without, everything comes from lkserve Settings (environment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lkserve.trainer")
    ap.add_argument("--config", help="JSON file of WorkerConfig fields")
    args = ap.parse_args(argv)
    if args.config:
        from lkserve.trainer.worker import Worker, WorkerConfig

        logging.basicConfig(level=os.environ.get("LKSERVE_LOG_LEVEL", "INFO"), format="%(message)s")
        with open(args.config) as f:
            Worker(WorkerConfig(**json.load(f))).run()
    else:
        from lkserve.config import load_settings
        from lkserve.trainer.worker import run_worker

        run_worker(load_settings())


if __name__ == "__main__":
    main()
