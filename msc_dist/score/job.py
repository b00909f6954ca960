"""Offline scoring of whole buckets. The driver plans and publishes; workers list, read, score
and write.

Input: every object under a prefix, recursively (listed page by page in tasks, one per
sub-prefix, never as one list), or WebDataset shards (recognised by shards.json, a brace or
.tar pattern, or by content: a folder of tar files). Read tasks fetch each object once (at most
--max-bytes + 1 bytes, retried on transient errors) and decode it; an actor pool holding model +
index (the ``Scorer`` that serving uses) scores; writer tasks write Parquet parts (uri, score,
is_anomaly, neighbors, error) and return one stats row each. An index version with a patch bank
adds, per image, its anomaly map's maximum (patch_score), the share of the map over the version's
map_threshold (area), the boxes of those regions ([x0, y0, x1, y1] in map pixels) and map_file;
with --maps DIR the scoring actors write a heatmap PNG of each image with pixels over the
threshold into DIR (``msc_dist.maps.map_file_name`` of its uri): maps never reach the driver.

Output: OUT/run-<id>/part-*.parquet plus OUT/_manifest.json, written last and only when the
share of error rows is within --max-error-fraction; then older runs are deleted. Read results
with ``read_scores(OUT)``, which follows the manifest."""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from msc_dist import checkpoint as ckpt
from msc_dist import storage
from msc_dist.capacity import check_capacity
from msc_dist.card import preprocess_of
from msc_dist.config import ConfigError, check_ranges
from msc_dist.data.rows import expand_listing, iter_listing, object_ext, read_objects, read_shards, shard_items
from msc_dist.data.shards import MANIFEST as SHARDS_MANIFEST, DataError, describe
from msc_dist.embed.workers import content_name
from msc_dist.index import IndexMismatch, read_manifest
from msc_dist.progress import bar
from msc_dist.ray_env import init_ray
from msc_dist.runtime import actor_threads, driver_cache, resolve as resolve_runtime
from msc_dist.score.config import INPUT_FORMATS, ScoreConfig
from msc_dist.scorer import check_pair, checkpoint_of

log = logging.getLogger("msc_dist.score")
OUT_MANIFEST = "_manifest.json"


class TooManyErrors(RuntimeError):
    """More error rows than --max-error-fraction allows: nothing was published."""


def _is_tar(uri: str) -> bool:
    try:
        with storage.open_file(uri, "rb") as f:
            head = f.read(512)
        return len(head) == 512 and head[257:262] == b"ustar"
    except Exception:
        return False


def input_format(spec: str, fmt: str = "auto", peek: int = 20) -> str:
    """``shards`` or ``objects``. auto: shards.json beside the data, a brace or .tar pattern, or
    a prefix whose first objects are all tar files (checked by content, not just the name)."""
    if fmt not in INPUT_FORMATS:
        raise ConfigError(f"unknown input format {fmt!r}; valid: {list(INPUT_FORMATS)}")
    if fmt != "auto":
        return fmt
    if "{" in spec or spec.endswith(".tar") or storage.exists(storage.join(spec, SHARDS_MANIFEST)):
        return "shards"
    if not storage.exists(spec):
        raise DataError(f"input {spec!r} does not exist")
    first = []
    for uri, _ in iter_listing(spec, recursive=True):
        first.append(uri)
        if len(first) >= peek:
            break
    if first and all(object_ext(u) == "tar" for u in first) and _is_tar(first[0]):
        return "shards"
    return "objects"


def listing_items(prefix: str) -> list[dict]:
    """The top level of the listing (objects directly under the prefix and its sub-prefixes):
    the driver holds one row per entry of one level, never the recursive listing."""
    fs = storage.filesystem(prefix)
    path = storage.path_of(prefix)
    if not fs.exists(path):
        raise DataError(f"input {prefix!r} does not exist")
    if not fs.isdir(path):  # one object (or a FIFO, device, ...: its read gives the error row)
        return [{"uri": prefix, "is_prefix": False}]
    return [{"uri": u, "is_prefix": p} for u, p in iter_listing(prefix, recursive=False)]


class ScoreActor:
    """Loads model card + index version once (the Scorer that serving uses); image rows -> score
    rows. ``index`` is the version folder the driver planned with (pinned: a version published
    during the run is not mixed in), ``preprocess`` what its read tasks decoded with."""

    def __init__(self, checkpoint: str, index: str, preprocess, use_gpu: bool = False, runtime: str = "torch",
                 threads: int | None = None, cache: str | None = None, maps: str | None = None):
        import torch

        from msc_dist.scorer import open_scorer

        dev = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = open_scorer(index, checkpoint, dev, use_gpu_index=use_gpu, runtime=runtime, threads=threads,
                                  cache=cache)
        if self.scorer.preprocess != preprocess:
            raise IndexMismatch(f"the read tasks decode with {preprocess}, the checkpoint's card is "
                                f"{self.scorer.preprocess}")
        self.map_thr, self.maps = self.scorer.map_threshold, maps  # map_thr None: no maps

    def __call__(self, batch: dict) -> dict:
        keep = ~np.asarray(batch["stats_only"], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
        n = len(batch["id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        score = np.full(n, np.nan, np.float64)
        is_anom = np.zeros(n, np.int8) - 1  # -1 = null (error, or no threshold in the index)
        neighbors = [json.dumps([])] * n
        # Objects: id == source == the object URI. Shards: "<shard url>#<sample key>".
        uri = np.array([s if s == i else f"{s}#{i}" for s, i in zip(batch["source"], batch["id"])], dtype=object)
        cols = self._map_columns(n) if self.map_thr is not None else None
        if ok.any():
            x = batch["image"][ok]
            res = self.scorer.score_arrays(x, maps=True) if cols is not None else self.scorer.score_arrays(x)
            for j, r in zip(np.flatnonzero(ok), res):
                score[j], neighbors[j] = r.score, json.dumps(r.neighbors)
                is_anom[j] = -1 if r.is_anomaly is None else int(r.is_anomaly)
                if cols is not None and r.map is not None:
                    self._map_row(cols, j, r.map, uri[j])
        out = {"uri": uri, "score": score, "is_anomaly": is_anom, "neighbors": np.array(neighbors, dtype=object),
               "error": batch["error"], "bytes_read": batch["bytes_read"]}
        return {**out, **(cols or {})}

    @staticmethod
    def _map_columns(n: int) -> dict:
        return {"patch_score": np.full(n, np.nan, np.float64), "area": np.full(n, np.nan, np.float64),
                "boxes": np.array([json.dumps([])] * n, dtype=object), "map_file": np.array([""] * n, dtype=object)}

    def _map_row(self, cols: dict, j: int, m: np.ndarray, uri: str) -> None:
        """One image's map columns; its heatmap written (by its uri) when pixels are over the threshold."""
        from msc_dist import maps

        s = maps.summary(m, self.map_thr)
        cols["patch_score"][j], cols["area"][j], cols["boxes"][j] = s["patch_score"], s["area"], json.dumps(s["boxes"])
        if self.maps and s["area"] > 0:
            name = maps.map_file_name(uri)
            storage.write_bytes_atomic(storage.join(self.maps, name), maps.heatmap_png(m, self.map_thr))
            cols["map_file"][j] = name


def _table(rows: dict):
    import pyarrow as pa

    ok = np.array([not e for e in rows["error"]], dtype=bool)
    anom = np.asarray(rows["is_anomaly"], dtype=np.int8)
    nb_type = pa.list_(pa.struct([("id", pa.string()), ("distance", pa.float32())]))
    cols = {
        "uri": pa.array([str(u) for u in rows["uri"]], pa.string()),
        "score": pa.array(rows["score"], pa.float64(), mask=~ok),
        "is_anomaly": pa.array(anom == 1, pa.bool_(), mask=anom < 0),
        "neighbors": pa.array([json.loads(s) for s in rows["neighbors"]], nb_type),
        "error": pa.array([e if e else None for e in rows["error"]], pa.string()),
    }
    if "patch_score" in rows:  # a version with a patch bank: the map columns
        ps, area = np.asarray(rows["patch_score"], np.float64), np.asarray(rows["area"], np.float64)
        cols.update({
            "patch_score": pa.array(ps, pa.float64(), mask=np.isnan(ps)),
            "area": pa.array(area, pa.float64(), mask=np.isnan(area)),
            "boxes": pa.array([json.loads(b) for b in rows["boxes"]], pa.list_(pa.list_(pa.int32(), 4))),
            "map_file": pa.array([f if f else None for f in rows["map_file"]], pa.string()),
        })
    return pa.table(cols)


def write_scores(batch: dict, out: str, run: str) -> dict:
    """Ray Data fn (a task): score rows -> one Parquet part of the run folder -> one stats row."""
    name = f"{run}/part-{content_name(batch['uri'])}.parquet"
    storage.write_table(storage.join(out, name), _table(batch))
    return {"file": [name], "rows": [len(batch["uri"])], "errors": [int(sum(1 for e in batch["error"] if e))],
            "bytes_read": [int(np.sum(batch["bytes_read"]))],
            "maps": [int(sum(1 for f in batch.get("map_file", ()) if f))]}


@dataclass
class ScoreOutcome:
    rows: int
    errors: int
    files: list[str]
    out: str
    bytes_read: int = 0
    seconds: float = 0.0
    maps: int = 0  # heatmap PNGs written (--maps)


def main(cfg: ScoreConfig) -> ScoreOutcome:
    import ray.data

    if not (cfg.index and cfg.input and cfg.out):
        raise ConfigError("--index, --input and --out are required")
    check_ranges(cfg)  # ScoreConfig.RANGES
    # The driver reads the live version's manifest and the checkpoint's card, never the index:
    # the actors load that version folder (pinned) and verify its files.
    man, folder = read_manifest(storage.expand(cfg.index))
    checkpoint = ckpt.resolve(checkpoint_of(man, cfg.checkpoint))
    ck = ckpt.load(checkpoint)  # checksums verified before any work
    pre = preprocess_of(ck.config)  # the model card's preprocessing: every image is decoded by it
    check_pair(man, ck.model_id, pre)  # refuses a manifest that disagrees with its checkpoint
    model_id, threshold, version = man.model_id, man.threshold, man.version
    if cfg.maps and (man.patch or {}).get("map_threshold") is None:
        raise ConfigError(f"--maps: index version {version} has no patch bank with a calibrated map threshold, so no "
                          "anomaly maps: rebuild it with python -m msc_dist.embed --patch-bank (and a calibration hold-out)")
    fmt = input_format(cfg.input, cfg.input_format)
    resolve_runtime(cfg.runtime, "cuda" if cfg.use_gpu else "cpu")  # fails before Ray starts
    init_ray(cfg.ray_address)
    check_capacity("scoring job", cfg.cpus_per_actor, 1 if cfg.use_gpu else 0, cfg.min_pool_size, cfg.ray_address)

    limits = {"preprocess": pre, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}
    if fmt == "shards":
        info = describe(cfg.input, scan=False)
        items = shard_items([(s.url, s.count) for s in info.shards], None)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shards, batch_size=1, batch_format="numpy", fn_kwargs={**limits, "block_rows": cfg.rows_per_task})
        total = info.count
    else:
        top = listing_items(cfg.input)
        if not top:
            raise DataError(f"no objects under {cfg.input!r}")
        ds = (ray.data.from_items(top, override_num_blocks=len(top))
              .map_batches(expand_listing, batch_size=1, batch_format="numpy", fn_kwargs={"block_rows": cfg.rows_per_task})
              .map_batches(read_objects, batch_size=cfg.rows_per_task, batch_format="numpy", fn_kwargs=limits))
        total = None
    ds = ds.map_batches(
        ScoreActor, fn_constructor_kwargs={"checkpoint": checkpoint, "index": folder, "preprocess": pre,
                                           "use_gpu": cfg.use_gpu, "runtime": cfg.runtime,
                                           "threads": actor_threads(cfg.cpus_per_actor), "cache": driver_cache(),
                                           "maps": cfg.maps and _folder(cfg.maps)},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_pool_size, max_size=max(cfg.pool_size, cfg.min_pool_size)),
        batch_size=cfg.batch_size, batch_format="numpy", num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ds = ds.map_batches(write_scores, fn_kwargs={"out": cfg.out, "run": run}, batch_size=cfg.rows_per_file,
                        batch_format="numpy")
    files, n_rows, n_err, n_bytes, n_maps, t0 = [], 0, 0, 0, 0, time.perf_counter()
    with bar(total=total, desc="score", unit="rows") as pb:
        for r in ds.iter_rows():  # one small row per written part
            files.append(r["file"])
            n_rows += int(r["rows"])
            n_err += int(r["errors"])
            n_bytes += int(r["bytes_read"])
            n_maps += int(r["maps"])
            pb.update(int(r["rows"]))
    if n_rows and n_err / n_rows > cfg.max_error_fraction:
        raise TooManyErrors(f"{n_err} of {n_rows} rows are errors ({n_err / n_rows:.1%}), above --max-error-fraction "
                            f"{cfg.max_error_fraction:.1%}: nothing published, the previous run stays; the rows "
                            f"are in {storage.join(cfg.out, run)} for inspection")
    # Publish: manifest last, then drop older runs (nothing points at them any more).
    man = {"run": run, "files": sorted(files), "rows": n_rows, "errors": n_err, "index": cfg.index,
           "index_version": version, "model_id": model_id, "threshold": threshold, "created": time.time(),
           "bytes_read": n_bytes, **({"maps": cfg.maps, "maps_written": n_maps} if cfg.maps else {})}
    storage.write_bytes_atomic(storage.join(cfg.out, OUT_MANIFEST), json.dumps(man, indent=1).encode())
    _drop_old_runs(cfg.out, run)
    dt = time.perf_counter() - t0
    log.info("published %s: %d rows (%d errors) in %.0fs, %.0f rows/s%s", run, n_rows, n_err, dt,
             n_rows / max(dt, 1e-9), f"; {n_maps} heatmaps in {cfg.maps}" if cfg.maps else "")
    return ScoreOutcome(n_rows, n_err, sorted(files), cfg.out, n_bytes, dt, n_maps)


def _folder(url: str) -> str:
    """A folder for the workers: URLs as given, a local path made absolute (workers' cwd may differ)."""
    return url if storage.is_remote(url) else os.path.abspath(storage.expand(url))


def _drop_old_runs(out: str, keep: str) -> None:
    fs = storage.filesystem(out)
    base = storage.path_of(out)
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

