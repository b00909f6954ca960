"""python -m msc_dist.train [--config FILE.yaml] [--flags ...]"""

from __future__ import annotations

import json
import logging
import sys

from msc_dist.config import ConfigError, parse_explicit
from msc_dist.data.shards import DataError
from msc_dist.train.config import HELP, TrainConfig


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, explicit = parse_explicit(TrainConfig, argv, "MSC fine-tuning on Ray Train (no --data: the demo set on a local Ray)", HELP)
    from msc_dist.train.job import main

    try:
        out = main(cfg, explicit)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": out.checkpoint, "run_dir": out.run_dir, "metrics": out.metrics}, indent=1, default=str))
    return 1 if out.error else 0


if __name__ == "__main__":
    sys.exit(cli())
