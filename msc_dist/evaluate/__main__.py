"""python -m msc_dist.evaluate --data DATA (--normal-class C | --all-classes) [--methods knn msc msc-noangular]"""

from __future__ import annotations

import logging
import os
import sys

from msc_dist.config import ConfigError, parse
from msc_dist.data.shards import DataError
from msc_dist.evaluate.config import HELP, EvalConfig


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse(EvalConfig, argv, "One-class evaluation: knn vs msc vs msc-noangular on the same split", HELP)
    from msc_dist.evaluate.job import main

    try:
        main(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(os.path.abspath(os.path.expanduser(cfg.out)), "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(cli())
