"""python -m msc_dist.embed [--config FILE.yaml] [--flags ...] = `msc embed` (msc_dist.cli)."""

from __future__ import annotations

import sys

from msc_dist.cli import run_module


def cli(argv: list[str] | None = None) -> int:
    return run_module(["embed"], argv)


if __name__ == "__main__":
    sys.exit(cli())
