"""`python -m lkserve.trainer [--settings FILE]`: run the adaptation worker.

Without --settings everything comes from lkserve Settings (environment, LKSERVE_CONFIG). FILE is a JSON dump of
Settings (`lkserve config show` prints one; the demo writes one): its values are taken as given, above the
environment, so a worker runs with exactly what its parent decided.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lkserve.trainer")
    ap.add_argument("--settings", help="JSON file of Settings (explicit values: they beat the environment)")
    args = ap.parse_args(argv)
    from lkserve.config import load_settings
    from lkserve.trainer.worker import run_worker

    if args.settings:
        with open(args.settings) as f:
            run_worker(load_settings(**json.load(f)))
    else:
        run_worker(load_settings())


if __name__ == "__main__":
    main()
