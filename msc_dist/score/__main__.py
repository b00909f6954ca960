"""python -m msc_dist.score --index DIR|s3://... --input s3://bucket/prefix|DIR|SHARDS --out DIR|s3://..."""

from __future__ import annotations

import json
import logging
import sys

from msc_dist.config import ConfigError, parse
from msc_dist.data.shards import DataError
from msc_dist.index import IndexMismatch
from msc_dist.score.config import HELP, ScoreConfig


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse(ScoreConfig, argv, "Score every image under a prefix (or shards) offline", HELP)
    from msc_dist.score.job import TooManyErrors, main

    try:
        out = main(cfg)
    except (ConfigError, DataError, IndexMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TooManyErrors as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"out": out.out, "rows": out.rows, "errors": out.errors, "files": out.files}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
