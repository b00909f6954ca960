"""python -m msc_dist.bench {train,embed,search,serve} [...] -> one JSON line."""

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
    e = sub.add_parser("embed", help="images/s of embedding, end to end from shards")
    e.add_argument("--backbone", default="efficientnet_lite0")
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--images", type=int, default=2048)
    e.add_argument("--loader-workers", type=int, default=2)
    e.add_argument("--data", default=None)
    s = sub.add_parser("search", help="queries/s of exact k-NN search against N vectors")
    s.add_argument("--n", type=int, default=100_000)
    s.add_argument("--d", type=int, default=1280)
    s.add_argument("--queries", type=int, default=10_000)
    s.add_argument("--k", type=int, default=2)
    s.add_argument("--num-shards", type=int, default=1)
    s.add_argument("--factory", default="Flat")
    s.add_argument("--use-gpu", action="store_true")
    v = sub.add_parser("serve", help="HTTP throughput and latency of the Serve app vs offline embedding")
    v.add_argument("--checkpoint", default="~/msc_runs/msc")
    v.add_argument("--index", default="~/msc_runs/msc/serving")
    v.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    v.add_argument("--seconds", type=float, default=10)
    v.add_argument("--files-per-request", type=int, default=8)
    v.add_argument("--replicas", type=int, default=1)
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.cmd == "embed":
        from msc_dist.bench.embed_search import bench_embed

        res = bench_embed(a.backbone, a.image_size, a.batch_size, a.device, a.images, a.loader_workers, a.data)
    elif a.cmd == "search":
        from msc_dist.bench.embed_search import bench_search

        res = bench_search(a.n, a.d, a.queries, a.k, a.num_shards, a.use_gpu, a.factory)
    elif a.cmd == "serve":
        from msc_dist.bench.serve import bench_serve

        res = bench_serve(a.checkpoint, a.index, a.concurrency, a.seconds, a.files_per_request, a.replicas, a.device)
    elif a.cmd == "train":
        from msc_dist.bench.train import bench_train

        res = bench_train(a.backbone, a.image_size, a.batch_size, a.device, a.steps, a.warmup, a.loader_workers,
                          a.data, a.compile, a.weights)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
