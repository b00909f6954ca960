"""The embedding job: Ray Data reads and decodes the normal shards in tasks, an actor pool embeds
them (one GPU per actor on GPU clusters), the driver writes Parquet by sample id and builds the
sharded FAISS index with a calibrated threshold. The index manifest is written last."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass

import numpy as np

from msc_dist import storage
from msc_dist.config import ConfigError
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.data.rows import EmbedActor, range_items, read_shard_ranges
from msc_dist.data.shards import DataError, describe
from msc_dist.embed.config import EmbedConfig
from msc_dist.index import IndexManifest, remove_manifest, write_index
from msc_dist.ray_env import init_ray
from msc_dist import checkpoint as ckpt
from msc_dist.train.job import resolve_labels

log = logging.getLogger("msc_dist.embed")

ROWS_PER_FILE = 100_000


@dataclass
class Embeddings:
    ids: list[str]
    sources: list[str]
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    z: np.ndarray  # (N, D) float32
    corrupt: list[str]


def embed_shards(data: str, keep: list[int] | None, checkpoint: str, image_size: int, cfg: EmbedConfig,
                 progress: str = "embed") -> Embeddings:
    """Embed every kept sample of ``data`` with the checkpoint on a Ray Data actor pool."""
    import ray.data

    info = describe(data)
    counts = kept_counts(info, LabelFilter(None if keep is None else frozenset(keep)))
    total = sum(n for _, n in counts)
    if total == 0:
        raise DataError(f"{data!r} has no samples to embed (kept labels: {keep})")
    items = range_items(counts, cfg.rows_per_task, keep=keep, image_size=image_size, max_pixels=cfg.max_pixels)
    ds = (
        ray.data.from_items(items)
        .map_batches(read_shard_ranges, batch_size=1, batch_format="numpy")
        .map_batches(
            EmbedActor, fn_constructor_kwargs={"checkpoint": checkpoint, "use_gpu": cfg.use_gpu},
            batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.pool_size,
            num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor,
        )
    )
    ids, sources, labels, zs, corrupt = [], [], [], [], []
    t0, seen = time.perf_counter(), 0
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        seen += len(b["id"])
        bad = np.array([bool(e) for e in b["error"]], dtype=bool)
        corrupt += [str(k) for k in b["id"][bad]]
        good = ~bad
        ids += [str(k) for k in b["id"][good]]
        sources += [str(s) for s in b["source"][good]]
        labels.append(b["label"][good])
        zs.append(b["embedding"][good])
        dt = time.perf_counter() - t0
        log.info("%s: %d/%d rows, %.0f rows/s, ETA %.0fs", progress, seen, total, seen / dt, (total - seen) / max(seen / dt, 1e-9))
    if corrupt:
        log.warning("%s: skipped %d corrupt samples: %s", progress, len(corrupt), corrupt[:50])
    z = np.concatenate(zs) if zs else np.zeros((0, 1), np.float32)
    return Embeddings(ids, sources, np.concatenate(labels) if labels else np.zeros(0, np.int64), z, corrupt)


def held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded, order-independent calibration hold-out by hashed sample id."""
    h = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32 for i in ids]
    return np.array(h) < fraction


def write_parquet(out: str, e: Embeddings, model_id: str, calibration: np.ndarray) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = storage.join(out, "embeddings")
    fs = storage.filesystem(folder)
    path = storage.strip_protocol(folder) if storage.is_remote(folder) else folder
    if fs.exists(path):
        fs.rm(path, recursive=True)  # the manifest is gone already: nothing points here
    files = []
    d = e.z.shape[1]
    for n, lo in enumerate(range(0, len(e.ids), ROWS_PER_FILE)):
        hi = min(len(e.ids), lo + ROWS_PER_FILE)
        lab = e.labels[lo:hi]
        table = pa.table({
            "id": pa.array(e.ids[lo:hi], pa.string()),
            "source": pa.array(e.sources[lo:hi], pa.string()),
            "label": pa.array(lab, pa.int64(), mask=lab < 0),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.z[lo:hi].reshape(-1), pa.float32()), d),
            "model_id": pa.array([model_id] * (hi - lo), pa.string()),
            "calibration": pa.array(calibration[lo:hi], pa.bool_()),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"part-{n:05d}.parquet"
        storage.write_bytes_atomic(storage.join(folder, name), buf.getvalue())
        files.append({"file": f"embeddings/{name}", "rows": hi - lo})
    return files


@dataclass
class EmbedOutcome:
    manifest: IndexManifest
    rows: int
    corrupt: int
    out: str


def main(cfg: EmbedConfig) -> EmbedOutcome:
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("--checkpoint and --out are required")
    if not 0 < cfg.target_fpr < 1:
        raise ConfigError(f"target_fpr must be in (0, 1), got {cfg.target_fpr}")
    ck_url = ckpt.resolve(cfg.checkpoint)
    ck = ckpt.load(ck_url)
    model_id = ck.model_id
    tcfg = ck.config
    data = cfg.data or tcfg.get("data")
    if not data:
        raise ConfigError("no --data and the checkpoint's config names none")
    info = describe(data)
    normal = resolve_labels(cfg.normal_classes or tcfg.get("normal_classes") or ["0"], info.classes)
    image_size = int(tcfg["image_size"])
    remove_manifest(cfg.out)
    init_ray(cfg.ray_address)

    e = embed_shards(data, normal, ck_url, image_size, cfg, "embed")
    if not e.ids:
        raise DataError(f"no decodable normal samples in {data!r}")
    if cfg.calibration_data:
        cal = embed_shards(cfg.calibration_data, normal, ck_url, image_size, cfg, "calibrate")
        is_cal = np.zeros(len(e.ids), bool)
        cal_z = cal.z
    else:
        is_cal = held_out(e.ids, cfg.calibration_fraction, cfg.seed)
        if is_cal.all() or len(e.ids) - is_cal.sum() < cfg.k:
            raise DataError(f"too few samples ({len(e.ids)}) to hold out {cfg.calibration_fraction:.0%} for calibration")
        cal_z = e.z[is_cal]
    files = write_parquet(cfg.out, e, model_id, is_cal)
    keep = ~is_cal
    man = write_index(
        cfg.out, e.z[keep], [i for i, k in zip(e.ids, keep) if k], model_id,
        num_shards=cfg.num_shards, factory=cfg.factory, k=cfg.k, calibration=cal_z, target_fpr=cfg.target_fpr,
        extra={"checkpoint": ck_url, "backbone": tcfg["backbone"], "image_size": image_size, "data": data,
               "embeddings": files, "corrupt": len(e.corrupt), "epoch": ck.meta.get("epoch")},
    )
    return EmbedOutcome(man, len(e.ids), len(e.corrupt), cfg.out)
