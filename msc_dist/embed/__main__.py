"""python -m msc_dist.embed --checkpoint DIR|s3://... --data SHARDS --out DIR|s3://..."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

from msc_dist.config import ConfigError, parse
from msc_dist.data.shards import DataError
from msc_dist.embed.config import HELP, EmbedConfig
from msc_dist.index import IndexMismatch


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse(EmbedConfig, argv, "Embed the normal set to Parquet and build the sharded FAISS index", HELP)
    from msc_dist.embed.job import main

    try:
        out = main(cfg)
    except (ConfigError, DataError, IndexMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = asdict(out.manifest)
    print(json.dumps({"out": out.out, "rows": out.rows, "corrupt": out.corrupt, "index_count": m["count"],
                      "threshold": m["threshold"], "model_id": m["model_id"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
