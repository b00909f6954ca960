from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from msc_dist.config import BATCH_RANGE, COUNT_RANGE, CPUS_RANGE, MAX_BYTES_RANGE, MAX_PIXELS_RANGE, Range

from msc_dist.runtime import HELP as RUNTIME_HELP

INPUT_FORMATS = ("auto", "objects", "shards")


@dataclass
class ScoreConfig:
    index: str | None = None
    input: str | None = None
    input_format: str = "auto"
    out: str | None = None
    checkpoint: str | None = None
    batch_size: int = 64
    pool_size: int = 1
    min_pool_size: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    rows_per_task: int = 256
    rows_per_file: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000
    max_error_fraction: float = 0.1
    ray_address: str | None = None
    runtime: str = "torch"
    maps: str | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "batch_size": BATCH_RANGE, "pool_size": COUNT_RANGE, "min_pool_size": COUNT_RANGE, "cpus_per_actor": CPUS_RANGE,
        "rows_per_task": Range(1, 1_000_000), "rows_per_file": Range(1, 100_000_000), "max_bytes": MAX_BYTES_RANGE,
        "max_pixels": MAX_PIXELS_RANGE, "max_error_fraction": Range(0, 1),
    }


HELP = {
    "index": "index folder (the embedding job's --out) or s3://...",
    "input": "s3://bucket/prefix or a folder (every object, recursively), or WebDataset shards",
    "input_format": "auto (shards.json, a .tar/brace pattern, or tar files by content = shards) | objects | shards",
    "out": "output folder or s3:// prefix for the scores Parquet",
    "checkpoint": "checkpoint (default: the one recorded in the index manifest)",
    "batch_size": "images per forward pass on each actor",
    "pool_size": "most scoring actors (one GPU each with --use-gpu); the pool autoscales between --min-pool-size and this",
    "min_pool_size": "fewest scoring actors",
    "use_gpu": "one GPU per scoring actor",
    "cpus_per_actor": "CPUs reserved per scoring actor",
    "rows_per_task": "objects per read/decode task (shards: rows per block; a task streams one whole shard)",
    "rows_per_file": "rows per output Parquet file",
    "max_bytes": "objects (and tar members) larger than this are not downloaded: at most this + 1 bytes are read (error row)",
    "max_pixels": "images above this many pixels are not decoded (error row)",
    "max_error_fraction": "a run with a larger share of error rows exits non-zero and publishes nothing",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    "runtime": "what runs each actor's forward: " + RUNTIME_HELP + "; CPU runtimes use --cpus-per-actor threads",
    "maps": "folder or s3:// prefix for a heatmap PNG of each image whose anomaly map has pixels over the version's "
            "map threshold (named by its uri, msc_dist.maps.map_file_name); needs an index version with a patch bank",
}
