"""The benchmarks' typed configs. Fields that mean what a job's field means are borrowed from
that job's config (same type, default and help), so a benchmark measures the job as configured."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from msc_dist.config import BATCH_RANGE, COUNT_RANGE, Range, borrow
from msc_dist.embed.config import HELP as EMBED_HELP
from msc_dist.embed.config import EmbedConfig
from msc_dist.runtime import HELP as RUNTIME_HELP
from msc_dist.train.config import HELP as TRAIN_HELP
from msc_dist.train.config import TrainConfig

DEVICE_HELP = "auto (cuda when available) | cpu | cuda | cuda:N"

STEP_KEYS = ("data", "backbone", "weights", "image_size", "batch_size", "loader_workers", "compile", "lr",
             "weight_decay", "momentum", "temperature", "angular_weight", "crop_min_scale", "view_source_scale", "hflip",
             "decode_on_device")


@dataclass
class BenchTrainConfig(borrow(TrainConfig, STEP_KEYS, "_StepFields")):
    device: str = "auto"
    steps: int = 10
    warmup: int = 2
    random_init: bool = False
    synthetic: bool = False
    profile_dir: str | None = None
    profile_steps: int = 5

    RANGES: ClassVar[dict[str, Range]] = {"steps": Range(1, 1_000_000), "warmup": Range(0, 1_000_000)}


TRAIN = {**{k: TRAIN_HELP[k] for k in STEP_KEYS}, "data": "shards to read (default: generated demo JPEGs)",
         "device": DEVICE_HELP, "steps": "timed steps", "warmup": "untimed steps first",
         "random_init": "random weights (throughput only; no weights needed)",
         "synthetic": "random batches on the device, no loader (the step's ceiling)",
         "profile_dir": "after the timed steps, profile --profile-steps more with torch.profiler; write the summary "
                        "(top kernels, host syncs, loader wait share) here as profile.txt and profile.json",
         "profile_steps": "steps profiled (>= 1) when --profile-dir is given"}


@dataclass
class BenchEmbedConfig(borrow(TrainConfig, ("data", "backbone", "image_size", "loader_workers", "decode_on_device"),
                              "_EmbedFields")):
    batch_size: int = 256
    device: str = "auto"
    images: int = 2048
    random_init: bool = False
    runtime: list[str] = field(default_factory=lambda: ["torch"])
    rounds: int = 1
    job: bool = False

    RANGES: ClassVar[dict[str, Range]] = {"batch_size": BATCH_RANGE, "images": Range(1, 10_000_000)}


EMBED = {**{k: TRAIN_HELP[k] for k in ("backbone", "image_size", "loader_workers", "decode_on_device")},
         "data": "shards to read (default: generated demo JPEGs)", "batch_size": "images per forward pass",
         "device": DEVICE_HELP, "images": "demo images to generate when --data is absent",
         "random_init": "random weights (throughput only; no weights needed)",
         "runtime": "one or more runtimes, timed in turn in each round (one JSON line each): " + RUNTIME_HELP,
         "rounds": "timed passes over the images per runtime (the median is reported)",
         "job": "also run the embedding job itself (msc embed, on the local Ray) on the same images with each runtime "
                "in each round: job_images_per_s, the rate its index pass prints"}


@dataclass
class BenchLoadConfig(borrow(TrainConfig, ("data", "image_size", "loader_workers"), "_LoadFields")):
    batch_size: int = 256
    images: int = 2048
    decode_on_device: str = "off"
    device: str = "auto"

    RANGES: ClassVar[dict[str, Range]] = {"batch_size": BATCH_RANGE, "images": Range(1, 10_000_000)}


LOAD = {**{k: TRAIN_HELP[k] for k in ("image_size", "loader_workers")},
        "decode_on_device": "off: decoded pixels from the workers | on: bytes, decoded in batches on --device "
                            "(the loader plus the device decode) | auto: on with a GPU",
        "device": DEVICE_HELP,
        "data": "shards to read (default: generated demo JPEGs)", "batch_size": "images per batch",
        "images": "demo images to generate when --data is absent"}

SEARCH_KEYS = ("k", "num_shards", "factory", "use_gpu")


@dataclass
class BenchSearchConfig(borrow(EmbedConfig, SEARCH_KEYS, "_SearchFields")):
    n: int = 100_000
    d: int = 1280
    queries: int = 10_000
    backend: str = "faiss"
    device: str = "auto"

    RANGES: ClassVar[dict[str, Range]] = {"n": Range(1, 1_000_000_000), "d": Range(1, 65_536),
                                          "queries": Range(1, 100_000_000)}


SEARCH = {**{k: EMBED_HELP[k] for k in SEARCH_KEYS}, "n": "indexed vectors", "d": "dimension",
          "queries": "query vectors", "device": DEVICE_HELP + " (torch backend)",
          "backend": "faiss: the index as the Scorer loads it | torch: scoring.knn_score on --device"}


@dataclass
class BenchServeConfig:
    checkpoint: str = os.path.join("~", "msc_runs", "msc")
    index: str = os.path.join("~", "msc_runs", "msc", "serving")
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    seconds: float = 10.0
    files_per_request: int = 8
    replicas: int = 1
    device: str = "auto"
    index_shards: int = 0
    runtime: str = "torch"
    detectors: int = 0
    max_detectors_per_replica: int = 4

    RANGES: ClassVar[dict[str, Range]] = {"concurrency": Range(1, 10_000), "seconds": Range(0, 86_400, lo_open=True),
                                          "files_per_request": Range(1, 1024), "replicas": COUNT_RANGE,
                                          "index_shards": Range(0, 1024), "detectors": Range(0, 10_000),
                                          "max_detectors_per_replica": Range(1, 4096)}


SERVE = {"checkpoint": "checkpoint or run folder", "index": "index folder (the embedding job's --out)",
         "concurrency": "client concurrencies to measure", "seconds": "seconds per measurement",
         "files_per_request": "images per multi-image request", "replicas": "Model replicas", "device": DEVICE_HELP,
         "runtime": "the Model replicas' runtime, and the offline embedding's: " + RUNTIME_HELP,
         "index_shards": "0: one Model deployment holding the whole index; N: the index spread over N IndexShard "
                         "deployments (max_score_diff against one unsharded index is reported)",
         "detectors": "0: one index; N: a registry of N detectors (each its own copy of the checkpoint and of the "
                      "index), single-image requests spread over them (cold-load seconds and evictions reported)",
         "max_detectors_per_replica": "with --detectors: detectors one Model replica holds at once (LRU)"}

QUALITY_KEYS = ("backbone", "weights", "image_size", "resize_mode", "epochs", "batch_size", "lr", "lr_schedule",
                "warmup_epochs", "weight_decay", "momentum", "temperature", "angular_weight", "crop_min_scale",
                "view_source_scale", "hflip", "eval_every", "knn_k", "collapse_cos", "collapse_rise", "on_collapse", "loader_workers", "seed")


@dataclass
class BenchQualityConfig(borrow(TrainConfig, QUALITY_KEYS, "_QualityFields")):
    data: str | None = None
    classes: list[str] | None = None
    methods: list[str] = field(default_factory=lambda: ["knn", "msc", "msc-noangular"])
    device: str = "auto"
    time_budget: float | None = None
    json_out: str | None = None
    loop: str = "ours"
    seeds: list[int] | None = None
    max_train: int | None = None
    max_test: int | None = None
    exts: list[str] | None = None
    groups: str | None = None
    plot_dir: str | None = None
    patch_stages: list[int] | None = None
    patch_norm: str | None = None
    patch_pool: int | None = None
    patch_budget: int | None = None
    patch_sigma: float | None = None
    patch_model: str = "msc"

    RANGES: ClassVar[dict[str, Range]] = {"eval_every": Range(0, 10_000),  # 0: final metrics only
                                          "patch_pool": Range(1, 15), "patch_budget": Range(1, 100_000),
                                          "patch_sigma": Range(0, 100),
                                          "time_budget": Range(0, None, lo_open=True), "seeds": Range(0, 2**32 - 1),
                                          "max_train": Range(1, None), "max_test": Range(1, None)}


QUALITY = {**{k: TRAIN_HELP[k] for k in QUALITY_KEYS},
           "eval_every": "ROC-AUC every N epochs; 0: final metrics only",
           "data": "MNIST-format npz, or an image folder with a subfolder per class (required)",
           "classes": "normal classes to run in turn (default: all)",
           "methods": "knn | msc | msc-fast | msc-natural | msc-noangular | patch | msc-patch (msc-fast / msc-natural: that preset's values "
                      "over these settings; patch / msc-patch: anomaly maps from the frozen / the msc trunk's patch "
                      "features, with pixel_roc_auc and pro where the data has masks, and combined_roc_auc: the same trunk's "
                      "global kNN and map maximum, each over its calibrated threshold, summed)",
           "patch_stages": "trunk stages of the patch methods' features (default: the backbone's)",
           "patch_norm": "none | unit: each stage's patch vector raw or unit-length (default: the backbone's)",
           "patch_pool": "odd neighbourhood averaged around each patch (default: PatchSpec's, 3)",
           "patch_budget": "bank patches per normal image (default: PatchSpec's)",
           "patch_sigma": "Gaussian smoothing of the upsampled map, px (default: PatchSpec's)",
           "patch_model": "msc | msc-fast | msc-natural | msc-noangular: the trained method whose model msc-patch takes (trained "
                          "once for both when both run)",
           "device": DEVICE_HELP,
           "seeds": "train each method once per seed; mean and spread reported (default: --seed alone)",
           "max_train": "seeded subset of the normal training images per class (npz only)",
           "max_test": "seeded subset of the test images (npz only)",
           "exts": "image extensions of a folder's images (the magnetic tiles: jpg; their masks are png)",
           "groups": "a folder's normal class split by whole groups: JSON {image path: group id} (see msc data make-shards --groups)",
           "plot_dir": "write the ROC-AUC per epoch of each class here (PNG)",
           "time_budget": "seconds; no new class starts after it", "json_out": "also write the result here",
           "loop": "ours (the product's training loop) | reference (the paper's procedure written plainly)"}

SCALE_KEYS = ("num_shards", "pool_size", "rows_per_task", "factory", "patch_bank", "patch_budget")


@dataclass
class BenchEmbedScaleConfig(borrow(EmbedConfig, SCALE_KEYS, "_ScaleFields")):
    rows: int = 20_000
    per_shard: int = 10_000
    rows_per_file: int | None = None
    workdir: str = os.path.join("~", "msc_runs", "bench-scale")

    RANGES: ClassVar[dict[str, Range]] = {"rows": Range(1, 100_000_000), "per_shard": Range(1, 10_000_000),
                                          "rows_per_file": Range(1, 100_000_000)}


SCALE = {**{k: EMBED_HELP[k] for k in SCALE_KEYS}, "rows": "tiny synthetic images to embed",
         "per_shard": "samples per shard", "rows_per_file": "rows per Parquet part (default: rows / 8)",
         "workdir": "where the data, the tiny checkpoint and the outputs go"}

BENCHES = {
    "train": (BenchTrainConfig, TRAIN, "images/s of the whole training step"),
    "embed": (BenchEmbedConfig, EMBED, "images/s of embedding, end to end from shards"),
    "load": (BenchLoadConfig, LOAD, "images/s of the loader alone (reading, decoding, batching)"),
    "search": (BenchSearchConfig, SEARCH, "queries/s of exact k-NN search against N vectors"),
    "serve": (BenchServeConfig, SERVE, "HTTP throughput and latency of the Serve app vs offline embedding"),
    "quality": (BenchQualityConfig, QUALITY,
                "one-class ROC-AUC etc. of knn / msc / msc-fast / msc-noangular / patch / msc-patch in one process, "
                "per seed (pixel ROC-AUC and PRO of the patch methods on data with masks)"),
    "embed-scale": (BenchEmbedScaleConfig, SCALE,
                    "the embedding job + index build on N tiny images: rows/s, driver peak RSS, bytes read ratio"),
}
