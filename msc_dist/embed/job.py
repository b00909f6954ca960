"""The embedding job. The driver plans and publishes; workers read, compute and write.

1. Read tasks stream each shard once and decode its kept samples (``data/rows.read_shards``).
2. An autoscaling actor pool embeds them (checkpoint loaded once per actor, one GPU each).
3. Writer tasks write Parquet parts into a new version folder (index rows and the seeded
   calibration hold-out apart) and return one stats row each: the driver holds file names and
   counts, never rows.
4. One Ray task per index shard builds it from its parts (trained factories start from one
   empty index trained on a seeded sample) and searches the calibration vectors in it; a last
   task merges those into the threshold.
5. The manifest is written last: the new version goes live in one write, and the previous one
   stays live until then."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace

from msc_dist import checkpoint as ckpt
from msc_dist import storage
from msc_dist.backbones import get_spec
from msc_dist.capacity import check_capacity
from msc_dist.card import index_record, preprocess_of
from msc_dist.config import ConfigError, check_ranges
from msc_dist.data.labels import resolve_labels
from msc_dist.data.decode import Preprocess
from msc_dist.data.loader import LabelFilter
from msc_dist.data.rows import read_shards, shard_items
from msc_dist.data.shards import DataError, describe
from msc_dist.embed.config import EmbedConfig
from msc_dist.embed.workers import EmbedActor, write_part
from msc_dist.index import (MAX_TRAIN_ROWS, IndexManifest, ShardEntry, assign_parts, build_shard_from_parts,
                            needs_training, new_version, publish, threshold_from_shards, train_from_parts,
                            version_root)
from msc_dist.index.build import build_bank_shard_from_parts, patch_thresholds
from msc_dist.patches import SCORE_MODES, SOURCES, PatchError, PatchSpec
from msc_dist.progress import bar
from msc_dist.ray_env import init_ray
from msc_dist.runtime import actor_threads, driver_cache, resolve as resolve_runtime

log = logging.getLogger("msc_dist.embed")


@dataclass
class PassStats:
    """What the driver keeps of a pass: file names and counts (one entry per Parquet part)."""

    parts: list[tuple[str, int]]  # (path relative to the version folder, rows)
    cal: list[tuple[str, int]]
    patch_grid: list[int] | None = None  # [h, w, C] of the patch features (a pass with a patch bank)
    rows: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0

    @property
    def bytes_read_ratio(self) -> float | None:
        return self.bytes_read / self.bytes_stored if self.bytes_stored else None


def embed_pass(data: str, keep: list[int] | None, checkpoint: str, model_id: str, preprocess: Preprocess,
               cfg: EmbedConfig, root: str, cal_fraction: float, role: str = "index", progress: str = "embed",
               patch_spec: dict | None = None) -> PassStats:
    """Embed every kept sample of ``data`` into Parquet parts under <root>/embeddings/, each
    image decoded by the checkpoint's ``preprocess`` (its model card)."""
    import ray.data

    info = describe(data, scan=False)  # counts from shards.json when there is one; never a scan
    counts = [(s.url, s.count_where(LabelFilter(None if keep is None else frozenset(keep)))) for s in info.shards]
    known = None if any(n is None for _, n in counts) else sum(n for _, n in counts)
    if known == 0:
        raise DataError(f"{data!r} has no samples to embed (kept labels: {keep})")
    items = shard_items(counts, keep)
    on_device = decode_on_device(cfg)
    limits = {"preprocess": preprocess, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
              "block_rows": cfg.rows_per_task, "encoded": on_device}
    gpus = 1 if cfg.use_gpu else 0
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs=limits)
        .map_batches(
            EmbedActor, fn_constructor_kwargs={"checkpoint": checkpoint, "preprocess": preprocess, "use_gpu": cfg.use_gpu,
                                               "max_pixels": cfg.max_pixels, "runtime": cfg.runtime,
                                               "threads": actor_threads(cfg.cpus_per_actor), "cache": driver_cache(),
                                               "patch_spec": patch_spec},
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_pool_size, max_size=max(cfg.pool_size, cfg.min_pool_size)),
            batch_size=cfg.batch_size, batch_format="numpy", num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
        )
        .map_batches(write_part, fn_kwargs={"out": root, "folder": "embeddings", "model_id": model_id,
                                            "cal_fraction": cal_fraction, "seed": cfg.seed, "role": role,
                                            "patch_spec": patch_spec},
                     batch_size=rows_per_file(cfg, patch_spec), batch_format="numpy")
    )
    st = PassStats([], [])
    t0 = time.perf_counter()
    with bar(total=known, desc=progress, unit="rows") as pb:
        for r in ds.iter_rows():  # one small row per written part
            if r["part"]:
                st.parts.append((r["part"], int(r["part_rows"])))
            if r["cal"]:
                st.cal.append((r["cal"], int(r["cal_rows"])))
            n = int(r["part_rows"]) + int(r["cal_rows"])
            st.rows += n
            if r.get("patch_grid") and json.loads(r["patch_grid"]):
                st.patch_grid = json.loads(r["patch_grid"])
            st.corrupt += int(r["corrupt"])
            st.bytes_read += int(r["bytes_read"])
            st.bytes_stored += int(r["bytes_stored"])
            pb.update(n + int(r["corrupt"]))
            if int(r["corrupt"]):
                log.warning("%s: skipped %d corrupt samples, e.g. %s", progress, int(r["corrupt"]),
                            json.loads(r["corrupt_keys"]))
    st.seconds = time.perf_counter() - t0
    return st


# Rows per Parquet part with a patch bank: a writer task holds every patch of its rows (EfficientNet-
# Lite0 at 224 px: 14 x 14 x 192 floats, 150 kB a row), so parts are cut at this many rows.
PATCH_ROWS_PER_FILE = 2048


def rows_per_file(cfg: EmbedConfig, patch_spec: dict | None) -> int:
    return min(cfg.rows_per_file, PATCH_ROWS_PER_FILE) if patch_spec else cfg.rows_per_file


def decode_on_device(cfg: EmbedConfig) -> bool:
    """auto: JPEGs are decoded on the actors' GPUs with --use-gpu, by PIL in the read tasks without."""
    if cfg.decode_on_device not in ("auto", "on", "off"):
        raise ConfigError(f"decode_on_device must be one of ['auto', 'on', 'off'], got {cfg.decode_on_device!r}")
    return cfg.decode_on_device == "on" or (cfg.decode_on_device == "auto" and cfg.use_gpu)


def _calibration_fraction(cfg: EmbedConfig, total: int | None) -> float:
    """The seeded hold-out: --calibration-fraction, shrunk so that at most --max-calibration
    samples are held out (a 1 % quantile needs thousands of samples, not millions)."""
    if total:
        return min(cfg.calibration_fraction, cfg.max_calibration / total)
    return cfg.calibration_fraction


def scoring_of(cfg: EmbedConfig, tcfg: dict) -> EmbedConfig:
    """--score-mode and --patch-source, else the checkpoint's (its training config records them),
    else global and frozen (checkpoints from before they were recorded)."""
    return replace(cfg, score_mode=cfg.score_mode or tcfg.get("score_mode") or "global",
                   patch_source=cfg.patch_source or tcfg.get("patch_source") or "frozen")


def patch_spec_of(cfg: EmbedConfig, backbone: str) -> PatchSpec | None:
    """The version's PatchSpec: None (no bank) with --score-mode global and no --patch-bank."""
    if cfg.score_mode not in SCORE_MODES:
        raise ConfigError(f"score_mode must be one of {list(SCORE_MODES)}, got {cfg.score_mode!r}")
    if cfg.patch_source not in SOURCES:
        raise ConfigError(f"patch_source must be one of {list(SOURCES)}, got {cfg.patch_source!r}")
    if cfg.score_mode == "global" and not cfg.patch_bank:
        return None
    if cfg.score_mode == "combined" and not cfg.calibration_data and cfg.calibration_fraction == 0:
        raise ConfigError("score_mode combined needs calibrated thresholds: give --calibration-data or a "
                          "--calibration-fraction in (0, 1)")
    try:
        return PatchSpec.default(backbone, stages=tuple(cfg.patch_stages) if cfg.patch_stages else None,
                                 norm=cfg.patch_norm, pool=cfg.patch_pool, budget=cfg.patch_budget, seed=cfg.seed, sigma=cfg.patch_sigma,
                                 source=cfg.patch_source)
    except PatchError as e:
        raise ConfigError(str(e)) from None


def build_index(root: str, version: str, parts: list[tuple[str, int]], cal: list[tuple[str, int]], cfg: EmbedConfig,
                dimension: int, model_id: str, extra: dict, patch: dict | None = None) -> IndexManifest:
    """Parallel build: one task per index shard (and its patch-bank shard, from the same parts),
    one training task for trained factories, one task for the thresholds. The driver holds
    object references and the shard entries. ``patch``: the PatchSpec dict + grid [h, w, C] and
    image size of a version with a patch bank."""
    import ray

    urls = [(storage.join(root, f), n) for f, n in parts]
    cal_urls = [storage.join(root, f) for f, _ in cal]
    groups = assign_parts(urls, cfg.num_shards)
    trained = None
    if needs_training(cfg.factory, dimension):
        picked, n = [], 0
        for u, rows in random.Random(cfg.seed).sample(urls, len(urls)):  # a seeded choice of whole parts
            picked.append(u)
            n += rows
            if n >= MAX_TRAIN_ROWS:
                break
        trained = ray.remote(train_from_parts).remote(picked, cfg.factory, cfg.seed)

    @ray.remote(num_returns=2)
    def shard_task(i: int, group: list[str], trained_index: bytes | None):
        r = build_shard_from_parts(root, i, group, cal_urls, cfg.factory, trained_index, cfg.k)
        return r["entry"], r["cal"]

    @ray.remote(num_returns=2)
    def bank_task(i: int, group: list[str]):
        r = build_bank_shard_from_parts(root, i, group, cal_urls, patch["grid"][2])
        return r["entry"], r["cal"]

    @ray.remote
    def threshold_task(*per_shard):
        return threshold_from_shards(list(per_shard), cfg.k, cfg.target_fpr)

    @ray.remote
    def patch_threshold_task(n: int, *per_shard):
        return patch_thresholds(list(per_shard[:n]), list(per_shard[n:]), cfg.k, cfg.target_fpr,
                                tuple(patch["grid"][:2]), patch["image_size"], patch["sigma"])

    refs = [shard_task.remote(i, g, trained) for i, g in enumerate(groups)]
    bank_refs = [bank_task.remote(i, g) for i, g in enumerate(groups)] if patch else []
    threshold_ref = threshold_task.remote(*[c for _, c in refs]) if cal else None
    patch_ref = (patch_threshold_task.remote(len(refs), *[c for _, c in refs], *[c for _, c in bank_refs])
                 if cal and patch else None)
    entries = [ShardEntry(**e) for e in ray.get([e for e, _ in refs])]
    log.info("index: %d shard(s) built, %d vectors", len(entries), sum(e.count for e in entries))
    cal_rows = sum(n for _, n in cal)
    threshold = ray.get(threshold_ref) if threshold_ref is not None else None
    patch_record = None
    if patch:
        bank = ray.get([e for e, _ in bank_refs])
        t = ray.get(patch_ref) if patch_ref is not None else None
        h, w, c = patch["grid"]
        spec = {k: v for k, v in patch.items() if k not in ("grid", "image_size")}
        patch_record = {**spec, "score_mode": cfg.score_mode, "map_threshold": t and t["map_threshold"],
                        "thresholds": t, "grid": [h, w], "dimension": c, "count": sum(e["count"] for e in bank),
                        "selection": "coreset", "shards": bank}
        log.info("patch bank: %d shard(s), %d patches of %d dimensions (%d per image), score mode %s",
                 len(bank), patch_record["count"], c, min(patch["budget"], h * w), cfg.score_mode)
        if cfg.score_mode != "global":
            threshold = t and t[cfg.score_mode]
    man = IndexManifest(dimension, sum(e.count for e in entries), entries, model_id, version=version, k=cfg.k,
                        factory=cfg.factory, threshold=threshold,
                        target_fpr=cfg.target_fpr if threshold is not None else None,
                        calibration_samples=cal_rows, extra=extra, patch=patch_record)
    return man


@dataclass
class EmbedOutcome:
    manifest: IndexManifest
    rows: int
    corrupt: int
    out: str
    bytes_read_ratio: float | None = None
    seconds: float = 0.0
    embed_seconds: float = 0.0  # the index pass alone (read, decode, forward, write), as its progress bar
    runtime: str = "torch"  # what ran the actors' forward (auto resolved)
    registered: str | None = None  # the MLflow model version (--tracking-uri)
    tracking_error: str | None = None

    @property
    def images_per_s(self) -> float:
        """Samples of the index pass per second (the progress bar's rate at its end)."""
        return (self.rows + self.corrupt) / self.embed_seconds if self.embed_seconds else 0.0


def main(cfg: EmbedConfig) -> EmbedOutcome:
    if cfg.detector:
        if cfg.out:
            raise ConfigError("give --out or --detector (which publishes into REGISTRY/NAME/), not both")
        from msc_dist.registry import check_publishable

        cfg = replace(cfg, out=check_publishable(cfg.registry, cfg.detector))
    if cfg.tracking_uri:
        from msc_dist.tracking import resolve_uri

        if not cfg.detector:
            raise ConfigError("--tracking-uri registers a detector's published versions: give --detector NAME too")
        cfg = replace(cfg, tracking_uri=resolve_uri(cfg.tracking_uri))  # its form, checked before Ray starts
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("--checkpoint and --out (or --detector) are required")
    check_ranges(cfg)  # EmbedConfig.RANGES
    t0 = time.perf_counter()
    ck_url = ckpt.resolve(cfg.checkpoint)
    ck = ckpt.load(ck_url)
    tcfg = ck.config
    data = cfg.data or tcfg.get("data")
    if not data:
        raise ConfigError("no --data and the checkpoint's config names none")
    info = describe(data, scan=False)
    normal = resolve_labels(cfg.normal_classes or tcfg.get("normal_classes") or ["0"], info.classes)
    pre = preprocess_of(tcfg)  # the model card's preprocessing: every image of both passes
    chosen = resolve_runtime(cfg.runtime, "cuda" if cfg.use_gpu else "cpu")  # fails before Ray starts
    cfg = scoring_of(cfg, tcfg)
    pspec = patch_spec_of(cfg, tcfg["backbone"])  # so does a bad patch option
    init_ray(cfg.ray_address)
    check_capacity("embedding job", cfg.cpus_per_actor, 1 if cfg.use_gpu else 0, cfg.min_pool_size, cfg.ray_address)

    version = new_version()
    root = version_root(cfg.out, version)
    keep = LabelFilter(frozenset(normal))
    total = None if info.count is None else sum(s.count_where(keep) for s in info.shards)
    own_cal = 0.0 if cfg.calibration_data else _calibration_fraction(cfg, total)
    pdict = pspec.to_dict() if pspec else None
    st = embed_pass(data, normal, ck_url, ck.model_id, pre, cfg, root, own_cal, "index", "embed", pdict)
    if cfg.calibration_data:
        cst = embed_pass(cfg.calibration_data, normal, ck_url, ck.model_id, pre, cfg, root, 1.0, "calibration",
                         "calibrate", pdict)
        st.cal += cst.cal
    index_rows = sum(n for _, n in st.parts)
    if index_rows < cfg.k:
        raise DataError(f"{index_rows} decodable normal samples in {data!r} after the calibration hold-out: "
                        f"need at least k = {cfg.k}")
    extra = {**index_record(ck_url, tcfg), "data": data,
             "embeddings": [{"file": f, "rows": n} for f, n in st.parts + st.cal],
             "corrupt": st.corrupt, "epoch": ck.meta.get("epoch"), "bytes_read": st.bytes_read,
             "bytes_stored": st.bytes_stored}
    dim = _dimension(tcfg["backbone"])
    patch = {**pdict, "grid": st.patch_grid, "image_size": pre.image_size} if pdict else None
    man = build_index(root, version, st.parts, st.cal, cfg, dim, ck.model_id, extra, patch)
    publish(cfg.out, man, cfg.keep_versions)
    ratio = st.bytes_read_ratio
    log.info("published index %s: %d vectors in %d shard(s), threshold %s; read %.2fx the stored bytes",
             version, man.count, len(man.shards), man.threshold, ratio or float("nan"))
    out = EmbedOutcome(man, st.rows, st.corrupt, cfg.out, ratio, time.perf_counter() - t0, st.seconds,
                       chosen)
    if cfg.tracking_uri:
        out.registered, out.tracking_error = _register(cfg, man)
    return out


def _register(cfg: EmbedConfig, man: IndexManifest) -> tuple[str | None, str | None]:
    """(MLflow version, None), or (None, the reason): the version is published either way."""
    from msc_dist.tracking import TrackingError, register_version

    try:
        v = register_version(cfg.tracking_uri, cfg.detector, version_root(cfg.out, man.version), man)
    except TrackingError as e:
        log.error("published, but not registered in MLflow: %s", e)
        return None, str(e)
    log.info("registered detector %s index version %s as MLflow model version %s", cfg.detector, man.version, v)
    return v, None


def _dimension(backbone: str) -> int:
    return get_spec(backbone).dim


def manifest_dict(out: EmbedOutcome) -> dict:
    return asdict(out.manifest)
