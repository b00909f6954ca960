"""Embedding throughput end to end from shards, and kNN search throughput."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from msc_dist.backbones import build_model
from msc_dist.bench.train import device_name, shard_counts
from msc_dist.data.loader import LabelFilter


def bench_embed(backbone: str, image_size: int, batch_size: int, device: str, n_images: int, loader_workers: int,
                data: str | None = None, pretrained: bool = True, decode_on_device: str = "auto",
                runtimes: list[str] | None = None, rounds: int = 1, cache: str | None = None,
                job: bool = False) -> dict | list[dict]:
    """Images/s of shard reading + decoding + H2D + forward (bf16 + channels_last on GPU); JPEGs
    decode on the GPU there (``decode_on_device`` auto). The model is written as a checkpoint and
    loaded as the jobs load it (``load_card``), once per runtime (``msc_dist.runtime``); with
    several runtimes each round times them in turn (alternated: a shared machine's load falls on
    all alike) and each gets one row (medians over ``rounds``), with ``model_images_per_s``: the
    forward alone on one in-memory batch, the rate the end-to-end path can at most reach. The
    graphs go to a temporary cache unless ``cache`` or $MSC_RUNTIME_CACHE names one. ``job``: each
    round also runs the embedding job (``embed.job.main``, the local Ray, one actor of its default
    CPUs) on the same shards with each runtime and the same graph cache: ``job_images_per_s``, the
    rate of its index pass. One runtime: one dict; several: one dict each."""
    from msc_dist import checkpoint as ckpt
    from msc_dist.card import load_card
    from msc_dist.runtime import driver_cache
    from msc_dist.train.config import TrainConfig
    from msc_dist.train.loop import loader_for

    runtimes = list(runtimes or ["torch"])
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    dev = torch.device(device)
    cfg = TrainConfig(image_size=image_size, batch_size=batch_size, loader_workers=loader_workers,
                      decode_on_device=decode_on_device)
    with tempfile.TemporaryDirectory() as tmp:
        counts, keep = shard_counts(tmp, data, n_images, image_size), LabelFilter(None)
        model = build_model(backbone, pretrained=pretrained)
        ck = os.path.join(tmp, "checkpoint")
        ckpt.save(ck, model.state_dict(), torch.nn.functional.normalize(torch.ones(model.dim), dim=0),
                  {"backbone": backbone, "image_size": image_size, "resize_mode": cfg.resize_mode}, {"epoch": 0})
        cards, load_s = {}, {}
        cache = cache or driver_cache() or os.path.join(tmp, "runtimes")
        for r in runtimes:
            t0 = time.perf_counter()
            cards[r] = load_card(ck, dev, r, cache=cache)
            load_s[r] = time.perf_counter() - t0
        torch.backends.cudnn.benchmark = True
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch_size, 3, image_size, image_size),
                                                               dtype=np.uint8)).to(dev)

        def run(card) -> int:
            n = 0
            for batch in loader_for(cfg, counts, keep, dev, train=False):
                if batch["images"].shape[0]:
                    card.embed(batch["images"])
                    n += int(batch["images"].shape[0])
            return n

        # the forward alone over as many images as the path embeds (at least 3 batches): a
        # shorter probe swung by half on a shared machine, above the path's own rate at times
        reps_alone = max(3, -(-n_images // batch_size))

        def raw(card, reps: int = reps_alone) -> float:
            t0 = time.perf_counter()
            for _ in range(reps):
                card.embed(x)
            return reps * batch_size / (time.perf_counter() - t0)

        for card in cards.values():  # warm-up: cudnn autotuning, page cache, the runtimes' first calls
            run(card)
            raw(card, 1)
        rates = {r: [] for r in runtimes}
        model_rates = {r: [] for r in runtimes}
        job_rates = {r: [] for r in runtimes}
        n = 0
        for i in range(rounds):
            for r, card in cards.items():
                t0 = time.perf_counter()
                n = run(card)
                rates[r].append(n / (time.perf_counter() - t0))
                model_rates[r].append(raw(card))
                if job:
                    job_rates[r].append(_job_rate(ck, data or os.path.join(tmp, "train"), os.path.join(tmp, f"job-{i}-{r}"),
                                                  r, batch_size, str(dev), cache))
    rows = []
    for r, card in cards.items():
        ips, mips = float(np.median(rates[r])), float(np.median(model_rates[r]))
        rows.append({"bench": "embed", "runtime": r, "backbone": backbone, "image_size": image_size,
                     "batch_size": batch_size, "device": device_name(dev), "loader_workers": loader_workers,
                     "images": n, "images_per_s": ips, "model_images_per_s": mips, "path_over_model": ips / mips,
                     "rounds": [round(v, 2) for v in rates[r]], "threads": card.threads or torch.get_num_threads(),
                     "load_s": load_s[r], "pretrained": pretrained, "torch": torch.__version__})
        if job:
            rows[-1].update(job_images_per_s=float(np.median(job_rates[r])), job_rounds=[round(v, 2) for v in job_rates[r]],
                            job_over_path=float(np.median(job_rates[r])) / ips)
    if "torch" in rates:
        for row in rows:
            row["over_torch"] = row["images_per_s"] / float(np.median(rates["torch"]))
            if job:
                row["job_over_torch"] = row["job_images_per_s"] / float(np.median(job_rates["torch"]))
    return rows[0] if len(rows) == 1 else rows


def _job_rate(checkpoint: str, data: str, out: str, runtime: str, batch_size: int, device: str, cache: str) -> float:
    """The embedding job's own images/s (its index pass, as it prints them) on ``data``, every
    label normal, with ``runtime``; its actors take their graphs from ``cache``."""
    from msc_dist.data.shards import describe
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main
    from msc_dist.runtime import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = cache  # the driver hands its actors this cache (runtime.driver_cache)
    try:
        cfg = EmbedConfig(checkpoint=checkpoint, data=data, out=out, runtime=runtime, batch_size=batch_size,
                          use_gpu=device.startswith("cuda"), normal_classes=list(describe(data, scan=False).classes))
        return main(cfg).images_per_s
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


def _unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_search_torch(n: int, d: int, queries: int, k: int, device: str) -> dict:
    """Queries/s of ``scoring.knn_score`` (exact, float32, chunked matmul + top-k) with the bank on
    ``device``: the path the training job's per-epoch evaluation uses."""
    from msc_dist.scoring import knn_score

    dev = torch.device(device)
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(_unit_rows(rng, n, d)).to(dev)
    q = torch.from_numpy(_unit_rows(rng, queries, d)).to(dev)
    chunk = 1024
    knn_score(q[:chunk], bank, k, chunk)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    s = knn_score(q, bank, k, chunk)
    float(s.sum())  # wait for the device
    dt = time.perf_counter() - t0
    return {"bench": "search", "backend": "torch", "n": n, "d": d, "queries": queries, "k": k,
            "device": device_name(dev), "queries_per_s": queries / dt}


def bench_search(n: int, d: int, queries: int, k: int, num_shards: int, use_gpu: bool, factory: str = "Flat") -> dict:
    """Queries/s of the index as the Scorer loads it (sharded FAISS; GPUs when asked and present)."""
    from msc_dist.index import load_index, write_index

    rng = np.random.default_rng(0)
    z = _unit_rows(rng, n, d)
    q = _unit_rows(rng, queries, d)
    with tempfile.TemporaryDirectory() as tmp:
        write_index(tmp, z, [str(i) for i in range(n)], "bench", num_shards=num_shards, factory=factory, k=k)
        idx = load_index(tmp, use_gpu=use_gpu)
        idx.search(q[:64], k)  # warm-up
        t0 = time.perf_counter()
        idx.search(q, k)
        dt = time.perf_counter() - t0
    import faiss

    return {"bench": "search", "backend": "faiss", "n": n, "d": d, "queries": queries, "k": k, "num_shards": num_shards, "factory": factory,
            "gpu": bool(use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0),
            "faiss_threads": faiss.omp_get_max_threads(), "queries_per_s": queries / dt}


def bench_load(image_size: int, batch_size: int, n_images: int, loader_workers: int, data: str | None = None,
               decode_on_device: str = "off", device: str = "cpu") -> dict:
    """Images/s of the loader alone (shard reading, decoding, batching, worker IPC): what the
    training and embedding steps can be fed at most. Compare with ``bench train --synthetic``.
    With ``decode_on_device`` the workers hand bytes and the batches decode on ``device``: the
    loader plus the device decode, without the step."""
    from msc_dist.train.config import TrainConfig
    from msc_dist.train.loop import decode_on_device as on_device, loader_for

    dev = torch.device(device)
    cfg = TrainConfig(image_size=image_size, batch_size=batch_size, loader_workers=loader_workers,
                      decode_on_device=decode_on_device)
    with tempfile.TemporaryDirectory() as tmp:
        counts, keep = shard_counts(tmp, data, n_images, image_size), LabelFilter(None)

        def run() -> int:
            n = sum(int(b["images"].shape[0]) for b in loader_for(cfg, counts, keep, dev, train=False))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return n

        run()  # warm-up: page cache
        t0 = time.perf_counter()
        n = run()
        dt = time.perf_counter() - t0
    return {"bench": "load", "image_size": image_size, "batch_size": batch_size, "loader_workers": loader_workers,
            "decode_on_device": on_device(cfg, dev), "device": device_name(dev),
            "images": n, "images_per_s": n / dt, "ms_per_image_per_worker": 1000 * dt * max(1, loader_workers) / n,
            "cpus": os.cpu_count()}
