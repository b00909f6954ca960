"""One benchmark from its typed config (``msc_dist.bench.config``) -> its result dict: what
``msc bench NAME`` and ``python -m msc_dist.bench NAME`` run."""

from __future__ import annotations

import json
import os
import sys

from msc_dist.config import ConfigError, project


def run(name: str, cfg) -> dict:
    """One benchmark from its config -> its result dict."""
    from msc_dist.scorer import resolve_device

    device = resolve_device(cfg.device) if hasattr(cfg, "device") else None
    if name == "embed":
        from msc_dist.bench.embed_search import bench_embed

        return bench_embed(cfg.backbone, cfg.image_size, cfg.batch_size, device, cfg.images, cfg.loader_workers,
                           cfg.data, pretrained=not cfg.random_init, decode_on_device=cfg.decode_on_device,
                           runtimes=cfg.runtime, rounds=cfg.rounds, job=cfg.job)
    if name == "load":
        from msc_dist.bench.embed_search import bench_load

        return bench_load(cfg.image_size, cfg.batch_size, cfg.images, cfg.loader_workers, cfg.data,
                          cfg.decode_on_device, device)
    if name == "search":
        from msc_dist.bench.embed_search import bench_search, bench_search_torch

        if cfg.backend not in ("faiss", "torch"):
            raise ConfigError(f"unknown backend {cfg.backend!r}; valid: ['faiss', 'torch']")
        if cfg.backend == "torch":
            return bench_search_torch(cfg.n, cfg.d, cfg.queries, cfg.k, device)
        return bench_search(cfg.n, cfg.d, cfg.queries, cfg.k, cfg.num_shards, cfg.use_gpu, cfg.factory)
    if name == "serve":
        from msc_dist.bench.serve import bench_serve, bench_serve_detectors

        if cfg.detectors > 0:
            return bench_serve_detectors(cfg.checkpoint, cfg.index, cfg.detectors, cfg.max_detectors_per_replica,
                                         cfg.concurrency, cfg.seconds, cfg.replicas, device, cfg.runtime)
        return bench_serve(cfg.checkpoint, cfg.index, cfg.concurrency, cfg.seconds, cfg.files_per_request,
                           cfg.replicas, device, cfg.index_shards, cfg.runtime)
    if name == "train":
        from msc_dist.bench.train import bench_train
        from msc_dist.train.config import TrainConfig

        if cfg.profile_dir and cfg.profile_steps < 1:
            raise ConfigError(f"profile_steps must be >= 1, got {cfg.profile_steps}")
        return bench_train(cfg.backbone, cfg.image_size, cfg.batch_size, device, cfg.steps, cfg.warmup,
                           cfg.loader_workers, cfg.data, cfg.compile, cfg.weights, pretrained=not cfg.random_init,
                           synthetic=cfg.synthetic, base=project(cfg, TrainConfig, data=None),
                           profile_dir=cfg.profile_dir, profile_steps=cfg.profile_steps)
    if name == "quality":
        from msc_dist.bench.quality import bench_quality
        from msc_dist.evaluate.job import list_classes
        from msc_dist.train.config import TrainConfig

        if not cfg.data:
            raise ConfigError("--data (an MNIST-format npz or an image folder) is required")
        classes = cfg.classes or list_classes(cfg.data)
        base = project(cfg, TrainConfig, data=None, use_gpu=device.startswith("cuda"))

        def save(r: dict) -> None:
            if cfg.json_out:
                with open(cfg.json_out + ".tmp", "w") as f:
                    json.dump(r, f, indent=1)
                os.replace(cfg.json_out + ".tmp", cfg.json_out)

        return bench_quality(cfg.data, classes, base, cfg.methods, device, cfg.time_budget,
                             log=lambda m: print(m, file=sys.stderr, flush=True), on_class=save, loop=cfg.loop,
                             seeds=cfg.seeds, max_train=cfg.max_train, max_test=cfg.max_test, exts=cfg.exts,
                             plot_dir=cfg.plot_dir, groups=cfg.groups,
                             patch={"stages": cfg.patch_stages, "norm": cfg.patch_norm, "pool": cfg.patch_pool, "budget": cfg.patch_budget,
                                    "sigma": cfg.patch_sigma}, patch_model=cfg.patch_model)
    if name == "embed-scale":
        from msc_dist.bench.scale import bench_embed_scale

        return bench_embed_scale(cfg.rows, os.path.expanduser(cfg.workdir), cfg.per_shard, cfg.num_shards,
                                 cfg.pool_size, cfg.rows_per_task, cfg.rows_per_file, cfg.factory,
                                 cfg.patch_bank, cfg.patch_budget)
    raise ConfigError(f"unknown benchmark {name!r}")
