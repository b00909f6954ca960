"""Offline scoring: list every object under a prefix (or read shards), decode in Ray Data tasks,
score on an actor pool holding model + index (the same ``Scorer`` that serving uses), and write
Parquet: uri, score, is_anomaly, neighbors, error. An unreadable object is a row with an error.

Output layout: OUT/run-<id>/part-*.parquet plus OUT/_manifest.json, written last; a rerun
writes a new run folder, swaps the manifest, then deletes older run folders. Read results with
``read_scores(OUT)``, which follows the manifest."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

from msc_dist import storage
from msc_dist.config import ConfigError
from msc_dist.data.decode import BadImage, decode_image
from msc_dist.data.rows import decoded_rows, range_items, read_shard_ranges
from msc_dist.data.shards import IMAGE_EXTS, MANIFEST as SHARDS_MANIFEST, DataError, describe
from msc_dist.index import load_index
from msc_dist.ray_env import init_ray
from msc_dist.score.config import ScoreConfig

log = logging.getLogger("msc_dist.score")
OUT_MANIFEST = "_manifest.json"


def is_shards(spec: str) -> bool:
    if "{" in spec or spec.endswith(".tar"):
        return True
    return storage.exists(storage.join(spec, SHARDS_MANIFEST))


def list_objects(prefix: str) -> list[str]:
    """Every object under the prefix, recursively, as full URIs (sorted)."""
    fs = storage.filesystem(prefix)
    remote = storage.is_remote(prefix)
    path = storage.strip_protocol(prefix) if remote else prefix
    if not fs.exists(path):
        raise DataError(f"input {prefix!r} does not exist")
    found = fs.find(path) if fs.isdir(path) else [path]
    proto = prefix.split("://", 1)[0] + "://" if remote else ""
    return sorted(proto + p for p in found if not p.rsplit("/", 1)[-1].startswith("."))


def read_objects(batch: dict) -> dict:
    """Ray Data fn: object URIs -> decoded rows; any failure is an error row, never a crash."""
    size, max_bytes, max_pixels = int(batch["image_size"][0]), int(batch["max_bytes"][0]), int(batch["max_pixels"][0])
    ids, images, errors = [], [], []
    for uri in batch["uri"]:
        uri = str(uri)
        img, err = None, None
        ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
        try:
            if ext not in IMAGE_EXTS:
                raise BadImage(f"not an image object (extension {ext or 'none'!r}; expected one of {list(IMAGE_EXTS)})")
            fs = storage.filesystem(uri)
            p = storage.strip_protocol(uri) if storage.is_remote(uri) else uri
            n = fs.size(p)
            if n > max_bytes:
                raise BadImage(f"object is {n} bytes, above the limit of {max_bytes}")
            with fs.open(p, "rb") as f:
                img = decode_image(f.read(), size, max_pixels)
        except BadImage as e:
            err = str(e)
        except Exception as e:  # storage errors: permission, vanished object, ...
            err = f"could not read object: {type(e).__name__}: {e}"
        if err:
            log.warning("cannot score %s: %s", uri, err)
        ids.append(uri)
        images.append(img)
        errors.append(err)
    return decoded_rows(ids, ids, [-1] * len(ids), images, errors, size)


class ScoreActor:
    """Loads model + index once (the same Scorer as serving); image rows -> score rows."""

    def __init__(self, checkpoint: str, index: str, use_gpu: bool = False):
        import torch

        from msc_dist.scorer import Scorer

        dev = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = Scorer(checkpoint, index, device=dev, use_gpu_index=use_gpu)

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        score = np.full(n, np.nan, np.float64)
        is_anom = np.zeros(n, bool)
        neighbors = [json.dumps([])] * n
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2)
            res = self.scorer.score_embeddings(self.scorer.embed(x))
            for j, r in zip(np.flatnonzero(ok), res):
                score[j], is_anom[j], neighbors[j] = r.score, bool(r.is_anomaly), json.dumps(r.neighbors)
        # Objects: id == source == the object URI. Shards: "<shard url>#<sample key>".
        uri = np.array([s if s == i else f"{s}#{i}" for s, i in zip(batch["source"], batch["id"])], dtype=object)
        return {"uri": uri, "score": score, "is_anomaly": is_anom,
                "neighbors": np.array(neighbors, dtype=object), "error": batch["error"]}


def _table(rows: dict):
    import pyarrow as pa

    ok = np.array([not e for e in rows["error"]], dtype=bool)
    nb_type = pa.list_(pa.struct([("id", pa.string()), ("distance", pa.float32())]))
    return pa.table({
        "uri": pa.array([str(u) for u in rows["uri"]], pa.string()),
        "score": pa.array(rows["score"], pa.float64(), mask=~ok),
        "is_anomaly": pa.array(rows["is_anomaly"], pa.bool_(), mask=~ok),
        "neighbors": pa.array([json.loads(s) for s in rows["neighbors"]], nb_type),
        "error": pa.array([e if e else None for e in rows["error"]], pa.string()),
    })


@dataclass
class ScoreOutcome:
    rows: int
    errors: int
    files: list[str]
    out: str


def main(cfg: ScoreConfig) -> ScoreOutcome:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    if not (cfg.index and cfg.input and cfg.out):
        raise ConfigError("--index, --input and --out are required")
    idx = load_index(cfg.index)  # verifies the manifest against its files before any work
    checkpoint = cfg.checkpoint or idx.manifest.extra.get("checkpoint")
    if not checkpoint:
        raise ConfigError("the index manifest names no checkpoint; pass --checkpoint")
    image_size = int(idx.manifest.extra["image_size"])
    init_ray(cfg.ray_address)

    common = {"image_size": image_size, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}
    if is_shards(cfg.input):
        info = describe(cfg.input)
        items = range_items([(s.url, s.count) for s in info.shards], cfg.rows_per_task, keep=None, **common)
        ds = ray.data.from_items(items).map_batches(read_shard_ranges, batch_size=1, batch_format="numpy")
        total = info.count
    else:
        uris = list_objects(cfg.input)
        if not uris:
            raise DataError(f"no objects under {cfg.input!r}")
        ds = ray.data.from_items([{"uri": u, **common} for u in uris]).map_batches(
            read_objects, batch_size=cfg.rows_per_task, batch_format="numpy")
        total = len(uris)
    ds = ds.map_batches(
        ScoreActor, fn_constructor_kwargs={"checkpoint": checkpoint, "index": cfg.index, "use_gpu": cfg.use_gpu},
        batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.pool_size,
        num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    files, pending, n_rows, n_err, t0 = [], [], 0, 0, time.perf_counter()

    def flush():
        if not pending:
            return
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(pending), buf)
        name = f"{run}/part-{len(files):05d}.parquet"
        storage.write_bytes_atomic(storage.join(cfg.out, name), buf.getvalue())
        files.append(name)
        pending.clear()

    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        t = _table(b)
        pending.append(t)
        n_rows += t.num_rows
        n_err += int(sum(1 for e in b["error"] if e))
        if sum(p.num_rows for p in pending) >= cfg.rows_per_file:
            flush()
        dt = time.perf_counter() - t0
        rate = n_rows / max(dt, 1e-9)
        log.info("scored %d/%d (%.0f rows/s, ETA %.0fs, %d errors)", n_rows, total, rate, (total - n_rows) / max(rate, 1e-9), n_err)
    flush()
    # Publish: manifest last, then drop older runs (nothing points at them any more).
    man = {"run": run, "files": files, "rows": n_rows, "errors": n_err, "index": cfg.index,
           "model_id": idx.manifest.model_id, "threshold": idx.manifest.threshold, "created": time.time()}
    storage.write_bytes_atomic(storage.join(cfg.out, OUT_MANIFEST), json.dumps(man, indent=1).encode())
    _drop_old_runs(cfg.out, run)
    return ScoreOutcome(n_rows, n_err, files, cfg.out)


def _drop_old_runs(out: str, keep: str) -> None:
    fs = storage.filesystem(out)
    base = storage.strip_protocol(out) if storage.is_remote(out) else out
    for p in fs.ls(base, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("run-") and name != keep:
            fs.rm(p, recursive=True)


def read_scores(out: str):
    """The published scores table (follows OUT/_manifest.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = storage.join(out, OUT_MANIFEST)
    if not storage.exists(url):
        raise FileNotFoundError(f"no {OUT_MANIFEST} in {out}: no finished scoring run")
    man = json.loads(storage.read_bytes(url))
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, f)))) for f in man["files"]]
    return pa.concat_tables(tables) if tables else None
