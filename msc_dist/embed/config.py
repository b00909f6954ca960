from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from msc_dist.config import BATCH_RANGE, COUNT_RANGE, CPUS_RANGE, MAX_BYTES_RANGE, MAX_PIXELS_RANGE, SEED_RANGE, Range

from msc_dist.registry import DEFAULT_REGISTRY, NAME_RULE
from msc_dist.runtime import HELP as RUNTIME_HELP


@dataclass
class EmbedConfig:
    checkpoint: str | None = None
    data: str | None = None
    out: str | None = None
    detector: str | None = None
    registry: str = DEFAULT_REGISTRY
    tracking_uri: str | None = None
    normal_classes: list[str] | None = None
    calibration_data: str | None = None
    calibration_fraction: float = 0.1
    target_fpr: float = 0.01
    batch_size: int = 64
    pool_size: int = 1
    min_pool_size: int = 1
    use_gpu: bool = False
    decode_on_device: str = "auto"
    cpus_per_actor: float = 1.0
    rows_per_task: int = 512
    rows_per_file: int = 100_000
    max_calibration: int = 100_000
    num_shards: int = 1
    keep_versions: int = 2
    factory: str = "Flat"
    k: int = 2
    seed: int = 0
    max_pixels: int = 64_000_000
    max_bytes: int = 64 * 1024 * 1024
    ray_address: str | None = None
    runtime: str = "torch"
    score_mode: str | None = None
    patch_bank: bool = False
    patch_source: str | None = None
    patch_stages: list[int] | None = None
    patch_norm: str | None = None
    patch_pool: int = 3
    patch_budget: int = 32
    patch_sigma: float = 4.0

    RANGES: ClassVar[dict[str, Range]] = {
        "calibration_fraction": Range(0, 1, hi_open=True), "target_fpr": Range(0, 1, lo_open=True, hi_open=True),
        "batch_size": BATCH_RANGE, "pool_size": COUNT_RANGE, "min_pool_size": COUNT_RANGE, "cpus_per_actor": CPUS_RANGE,
        "rows_per_task": Range(1, 1_000_000), "rows_per_file": Range(1, 100_000_000),
        "max_calibration": Range(1, 100_000_000), "num_shards": Range(1, 10_000), "keep_versions": Range(1, 1000),
        "k": Range(1, 1000), "seed": SEED_RANGE, "max_pixels": MAX_PIXELS_RANGE, "max_bytes": MAX_BYTES_RANGE,
        "patch_pool": Range(1, 15), "patch_budget": Range(1, 100_000), "patch_sigma": Range(0, 100),
    }


HELP = {
    "checkpoint": "checkpoint folder, or a run folder (its newest checkpoint); local or s3://",
    "data": "normal training shards (default: the checkpoint's training data)",
    "out": "output folder or s3:// prefix: versions/<id>/{manifest.json,index/,embeddings/} and the current.json pointer",
    "detector": "publish into the registry as this detector (REGISTRY/NAME/, in place of --out): " + NAME_RULE,
    "registry": "the detector registry, a folder or s3:// prefix (with --detector)",
    "tracking_uri": "with --detector: also register the published version in this MLflow store (sqlite:///PATH.db, "
                    "file:PATH or http(s)://HOST:PORT) as a version of the registered model of the detector",
    "normal_classes": "labels counted as normal (default: the checkpoint's)",
    "calibration_data": "held-out normal shards for the threshold (default: a seeded fraction of --data)",
    "calibration_fraction": "fraction of --data held back from the index for calibration when --calibration-data is absent",
    "target_fpr": "false-positive rate on normal samples that the threshold is set for",
    "batch_size": "images per forward pass on each actor",
    "pool_size": "most embedding actors (one GPU each with --use-gpu); the pool autoscales between --min-pool-size and this",
    "min_pool_size": "fewest embedding actors",
    "use_gpu": "one GPU per embedding actor, bf16; FAISS on GPUs when faiss-gpu is installed",
    "decode_on_device": "auto | on | off: read tasks pass encoded bytes and the actors decode JPEGs in batches on their device (auto: with --use-gpu)",
    "cpus_per_actor": "CPUs reserved per embedding actor",
    "rows_per_task": "rows per block handed from the read tasks to the actors (each read task streams one whole shard once)",
    "rows_per_file": "rows per Parquet part (each written by a worker; at most 2048 with a patch bank)",
    "max_calibration": "at most this many held-out normal samples for the threshold (the hold-out fraction shrinks to fit)",
    "num_shards": "FAISS index shards (each built by its own task)",
    "keep_versions": "published index versions kept under OUT/versions (the live one and those before it)",
    "factory": "FAISS factory string (Flat = exact; e.g. IVF4096,PQ64 for very large sets)",
    "k": "neighbours in the score",
    "seed": "seed of the calibration hold-out",
    "max_pixels": "larger images are skipped as corrupt",
    "max_bytes": "tar members larger than this are not read (skipped as corrupt)",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    "runtime": "what runs each actor's forward: " + RUNTIME_HELP + "; CPU runtimes use --cpus-per-actor threads",
    "score_mode": "global | patch | combined: the image score of the version (global: the kNN of the pooled feature, "
                  "as before; patch: the anomaly map's maximum; combined: each divided by its calibrated threshold, "
                  "summed); patch and combined build the patch bank (default: the checkpoint's score_mode, else global)",
    "patch_bank": "build the patch bank (anomaly maps) even with --score-mode global",
    "patch_source": "frozen | msc: patch features from the ImageNet trunk or from the fine-tuned checkpoint "
                    "(default: the checkpoint's patch_source, else frozen)",
    "patch_stages": "trunk stages of the patch features (default: the backbone's, e.g. 4 5 for EfficientNet-Lite)",
    "patch_norm": "none | unit: each stage's patch vector raw or scaled to length 1 (default: the backbone's, "
                  "unit for EfficientNet-Lite)",
    "patch_pool": "odd neighbourhood (patches) averaged around each patch",
    "patch_budget": "bank patches kept per normal image (greedy coreset within the image)",
    "patch_sigma": "Gaussian smoothing of the upsampled anomaly map, in pixels",
}
