"""python -m msc_dist.bench {train,embed,embed-scale,load,search,serve,quality} [...] -> one JSON line.

The same parser as ``msc bench``: each benchmark's flags come from its typed config
(``msc_dist.bench.config``), which borrows the training and embedding jobs' fields. What each
benchmark runs is ``msc_dist.bench.runner``."""

from __future__ import annotations

import sys

from msc_dist.cli import run_module


def main(argv: list[str] | None = None) -> int:
    return run_module(["bench"], argv, prog="python -m msc_dist.bench")


if __name__ == "__main__":
    sys.exit(main())
