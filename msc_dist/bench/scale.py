"""``bench embed-scale``: the real embedding job and index build on the local Ray over N tiny
synthetic images, with a deliberately cheap model, so that the job's own overheads dominate.
Reports what decides whether the job survives 100 M rows: the driver's peak RSS (from the OS)
and the bytes read per byte stored. ``patch_bank``: the job also builds the patch bank (tiny_cnn's
patches of each 8 px image, ``patch_budget`` per image), in the same index shards."""

from __future__ import annotations

import io
import os
import resource
import time

import numpy as np


def make_scale_data(out: str, rows: int, per_shard: int = 10_000, size: int = 8, distinct: int = 1024, seed: int = 0):
    """N unlabelled ``size`` px PNGs in shards (a pool of ``distinct`` images under unique keys:
    cheap to write, and the job cannot tell). Reused when already there."""
    from PIL import Image

    from msc_dist.data.shards import ShardWriter, describe

    if os.path.exists(os.path.join(out, "shards.json")):
        info = describe(out)
        if info.count == rows:
            return info
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    with ShardWriter(out, per_shard) as w:
        for i in range(rows):
            w.write(f"s{i:09d}", pool[i % distinct], "png")
    return describe(out)


def make_tiny_checkpoint(folder: str, data: str, image_size: int = 8) -> str:
    import torch

    from msc_dist import checkpoint as ckpt
    from msc_dist.backbones import build_model

    if not os.path.exists(os.path.join(folder, "meta.json")):
        model = build_model("tiny_cnn")
        center = torch.nn.functional.normalize(torch.ones(model.dim), dim=0)
        ckpt.save(folder, model.state_dict(), center, {"backbone": "tiny_cnn", "image_size": image_size, "data": data},
                  {"epoch": 0})
    return folder


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_embed_scale(rows: int, workdir: str, per_shard: int = 10_000, num_shards: int = 4, pool_size: int = 1,
                      rows_per_task: int = 512, rows_per_file: int | None = None, factory: str = "Flat",
                      patch_bank: bool = False, patch_budget: int = 32) -> dict:
    """``rows_per_file`` defaults to rows / 8: the same number of parts at every N, enough for
    ``num_shards`` index shards (a shard is built from whole parts)."""
    rows_per_file = rows_per_file or max(1000, rows // 8)
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main

    data = os.path.join(workdir, f"data-{rows}")
    make_scale_data(data, rows, per_shard)
    ck = make_tiny_checkpoint(os.path.join(workdir, "ckpt-tiny"), data)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    res = embed_main(EmbedConfig(checkpoint=ck, data=data, out=os.path.join(workdir, f"out-{rows}"),
                                 num_shards=num_shards, pool_size=pool_size, rows_per_task=rows_per_task,
                                 rows_per_file=rows_per_file, factory=factory, batch_size=1024,
                                 patch_bank=patch_bank, patch_budget=patch_budget))
    dt = time.perf_counter() - t0
    return {"bench": "embed-scale", "rows": res.rows, "rows_per_s": round(res.rows / dt, 1), "seconds": round(dt, 1),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1), "driver_rss_before_job_mb": round(rss_before, 1),
            "bytes_read_ratio": None if res.bytes_read_ratio is None else round(res.bytes_read_ratio, 4),
            "index_shards": len(res.manifest.shards), "index_count": res.manifest.count,
            "parts": len(res.manifest.extra["embeddings"]), "factory": factory, "corrupt": res.corrupt,
            **_bank_figures(res.manifest)}


def _bank_figures(man) -> dict:
    """The patch bank's size (a version with one), from its manifest."""
    if not man.patch:
        return {"patch_bank": False}
    per_image = man.patch["count"] / max(man.count, 1)
    return {"patch_bank": True, "bank_shards": len(man.patch["shards"]), "bank_patches": man.patch["count"],
            "bank_patches_per_image": per_image, "bank_dimension": man.patch["dimension"],
            "bank_bytes_per_image": round(per_image * man.patch["dimension"] * 4, 1)}
