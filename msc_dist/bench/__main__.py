"""python -m msc_dist.bench train [--backbone ...] -> one JSON line per run."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msc_dist.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="images/s of the whole training step")
    t.add_argument("--backbone", default="efficientnet_lite0")
    t.add_argument("--weights", default=None)
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--loader-workers", type=int, default=2)
    t.add_argument("--data", default=None, help="shards to read (default: generated demo JPEGs)")
    t.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "train":
        from msc_dist.bench.train import bench_train

        res = bench_train(a.backbone, a.image_size, a.batch_size, a.device, a.steps, a.warmup, a.loader_workers,
                          a.data, a.compile, a.weights)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
