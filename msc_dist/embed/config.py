from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbedConfig:
    checkpoint: str | None = None
    data: str | None = None
    out: str | None = None
    normal_classes: list[str] | None = None
    calibration_data: str | None = None
    calibration_fraction: float = 0.1
    target_fpr: float = 0.01
    batch_size: int = 64
    pool_size: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    rows_per_task: int = 512
    num_shards: int = 1
    factory: str = "Flat"
    k: int = 2
    seed: int = 0
    max_pixels: int = 64_000_000
    ray_address: str | None = None


HELP = {
    "checkpoint": "checkpoint folder, or a run folder (its newest checkpoint); local or s3://",
    "data": "normal training shards (default: the checkpoint's training data)",
    "out": "output folder or s3:// prefix: embeddings/*.parquet and index/",
    "normal_classes": "labels counted as normal (default: the checkpoint's)",
    "calibration_data": "held-out normal shards for the threshold (default: a seeded fraction of --data)",
    "calibration_fraction": "fraction of --data held back from the index for calibration when --calibration-data is absent",
    "target_fpr": "false-positive rate on normal samples that the threshold is set for",
    "batch_size": "images per forward pass on each actor",
    "pool_size": "embedding actors (one GPU each with --use-gpu)",
    "use_gpu": "one GPU per embedding actor, bf16; FAISS on GPUs when faiss-gpu is installed",
    "cpus_per_actor": "CPUs reserved per embedding actor",
    "rows_per_task": "samples per read/decode task",
    "num_shards": "FAISS index shards",
    "factory": "FAISS factory string (Flat = exact; e.g. IVF4096,PQ64 for very large sets)",
    "k": "neighbours in the score",
    "seed": "seed of the calibration hold-out",
    "max_pixels": "larger images are skipped as corrupt",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
}
