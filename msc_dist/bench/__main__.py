"""python -m msc_dist.bench {train,embed,embed-scale,load,search,serve,quality} [...] -> one JSON line."""

from __future__ import annotations

import argparse
import json
import os
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
    t.add_argument("--random-init", action="store_true", help="random weights (throughput only; no weights needed)")
    t.add_argument("--synthetic", action="store_true", help="random batches on the device, no loader (the step's ceiling)")
    e = sub.add_parser("embed", help="images/s of embedding, end to end from shards")
    e.add_argument("--backbone", default="efficientnet_lite0")
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--images", type=int, default=2048)
    e.add_argument("--loader-workers", type=int, default=2)
    e.add_argument("--data", default=None)
    e.add_argument("--random-init", action="store_true", help="random weights (throughput only; no weights needed)")
    ld = sub.add_parser("load", help="images/s of the loader alone (reading, decoding, batching)")
    ld.add_argument("--image-size", type=int, default=224)
    ld.add_argument("--batch-size", type=int, default=256)
    ld.add_argument("--images", type=int, default=2048)
    ld.add_argument("--loader-workers", type=int, default=2)
    ld.add_argument("--data", default=None)
    s = sub.add_parser("search", help="queries/s of exact k-NN search against N vectors")
    s.add_argument("--n", type=int, default=100_000)
    s.add_argument("--d", type=int, default=1280)
    s.add_argument("--queries", type=int, default=10_000)
    s.add_argument("--k", type=int, default=2)
    s.add_argument("--num-shards", type=int, default=1)
    s.add_argument("--factory", default="Flat")
    s.add_argument("--use-gpu", action="store_true")
    s.add_argument("--backend", choices=["faiss", "torch"], default="faiss",
                   help="faiss: the index as the Scorer loads it; torch: scoring.knn_score on --device")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v = sub.add_parser("serve", help="HTTP throughput and latency of the Serve app vs offline embedding")
    v.add_argument("--checkpoint", default="~/msc_runs/msc")
    v.add_argument("--index", default="~/msc_runs/msc/serving")
    v.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    v.add_argument("--seconds", type=float, default=10)
    v.add_argument("--files-per-request", type=int, default=8)
    v.add_argument("--replicas", type=int, default=1)
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v.add_argument("--index-shards", type=int, default=0,
                   help="N > 0: the index over N IndexShard deployments (resharded into N when it has fewer); "
                        "adds max_score_diff against one unsharded index")
    q = sub.add_parser("quality", help="one-class ROC-AUC etc. of knn / msc / msc-noangular in one process (MNIST npz)")
    q.add_argument("--data", required=True, help="MNIST-format npz")
    q.add_argument("--classes", nargs="+", default=None, help="normal classes to run in turn (default: all)")
    q.add_argument("--methods", nargs="+", default=["knn", "msc", "msc-noangular"])
    q.add_argument("--backbone", default="efficientnet_lite0")
    q.add_argument("--weights", default=None)
    q.add_argument("--image-size", type=int, default=224)
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=1e-5)
    q.add_argument("--crop-min-scale", type=float, default=0.2)
    q.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--eval-every", type=int, default=1, help="ROC-AUC every N epochs; 0: final metrics only")
    q.add_argument("--loader-workers", type=int, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--time-budget", type=float, default=None, help="seconds; no new class starts after it")
    q.add_argument("--json-out", default=None, help="also write the result here")
    es = sub.add_parser("embed-scale", help="the embedding job + index build on N tiny images: rows/s, driver RSS, bytes read")
    es.add_argument("--rows", type=int, default=20_000)
    es.add_argument("--per-shard", type=int, default=10_000)
    es.add_argument("--num-shards", type=int, default=4, help="index shards")
    es.add_argument("--pool-size", type=int, default=1)
    es.add_argument("--rows-per-task", type=int, default=512)
    es.add_argument("--rows-per-file", type=int, default=100_000)
    es.add_argument("--factory", default="Flat")
    es.add_argument("--workdir", default=os.path.expanduser("~/msc_runs/bench-scale"))
    a = p.parse_args(argv)
    if a.cmd == "embed-scale":
        from msc_dist.bench.scale import bench_embed_scale

        res = bench_embed_scale(a.rows, a.workdir, a.per_shard, a.num_shards, a.pool_size, a.rows_per_task,
                                a.rows_per_file, a.factory)
    elif a.cmd == "embed":
        from msc_dist.bench.embed_search import bench_embed

        res = bench_embed(a.backbone, a.image_size, a.batch_size, a.device, a.images, a.loader_workers, a.data,
                          pretrained=not a.random_init)
    elif a.cmd == "load":
        from msc_dist.bench.embed_search import bench_load

        res = bench_load(a.image_size, a.batch_size, a.images, a.loader_workers, a.data)
    elif a.cmd == "search":
        from msc_dist.bench.embed_search import bench_search, bench_search_torch

        if a.backend == "torch":
            res = bench_search_torch(a.n, a.d, a.queries, a.k, a.device)
        else:
            res = bench_search(a.n, a.d, a.queries, a.k, a.num_shards, a.use_gpu, a.factory)
    elif a.cmd == "serve":
        from msc_dist.bench.serve import bench_serve

        res = bench_serve(a.checkpoint, a.index, a.concurrency, a.seconds, a.files_per_request, a.replicas, a.device,
                          a.index_shards)
    elif a.cmd == "train":
        from msc_dist.bench.train import bench_train

        res = bench_train(a.backbone, a.image_size, a.batch_size, a.device, a.steps, a.warmup, a.loader_workers,
                          a.data, a.compile, a.weights, pretrained=not a.random_init,
                          synthetic=a.synthetic)
    elif a.cmd == "quality":
        from msc_dist.bench.quality import bench_quality
        from msc_dist.evaluate.job import list_classes
        from msc_dist.train.config import TrainConfig

        classes = a.classes or list_classes(a.data)
        base = TrainConfig(backbone=a.backbone, weights=a.weights, image_size=a.image_size, epochs=a.epochs,
                           batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every,
                           crop_min_scale=a.crop_min_scale, hflip=a.hflip,
                           loader_workers=a.loader_workers, seed=a.seed, use_gpu=a.device.startswith("cuda"))

        def save(r: dict) -> None:
            if a.json_out:
                with open(a.json_out + ".tmp", "w") as f:
                    json.dump(r, f, indent=1)
                os.replace(a.json_out + ".tmp", a.json_out)

        res = bench_quality(a.data, classes, base, a.methods, a.device, a.time_budget,
                            log=lambda m: print(m, file=sys.stderr, flush=True), on_class=save)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
