from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from msc_dist.config import BATCH_RANGE, MAX_PIXELS_RANGE, Range

from msc_dist.config import borrow
from msc_dist.runtime import HELP as RUNTIME_HELP
from msc_dist.train.config import HELP as TRAIN_HELP
from msc_dist.train.config import TrainConfig

# The training fields that evaluation passes on to the training job unchanged (types and help
# from TrainConfig). The protocol's own defaults differ on purpose: a shorter run on one worker.
TRAIN_KEYS = ("backbone", "weights", "image_size", "resize_mode", "epochs", "batch_size", "lr", "lr_schedule",
              "warmup_epochs", "crop_min_scale", "hflip",
              "num_workers", "loader_workers", "use_gpu", "seed", "ray_address")
_EvalTrainFields = borrow(TrainConfig, TRAIN_KEYS, "_EvalTrainFields", epochs=10, batch_size=32, num_workers=1)


@dataclass
class EvalConfig(_EvalTrainFields):
    data: str | None = None
    normal_class: str | None = None
    all_classes: bool = False
    methods: list[str] = field(default_factory=lambda: ["knn", "msc", "msc-noangular"])
    out: str = os.path.join("~", "msc_runs", "eval")
    exts: list[str] | None = None
    train_fraction: float = 0.7
    groups: str | None = None
    calibration_fraction: float = 0.1
    target_fpr: float = 0.05
    gallery_k: int = 6

    # (and the borrowed training fields' ranges, from TrainConfig.RANGES)
    RANGES: ClassVar[dict[str, Range]] = {
        "train_fraction": Range(0, 1, lo_open=True, hi_open=True),
        "calibration_fraction": Range(0, 1, lo_open=True, hi_open=True),
        "target_fpr": Range(0, 1, lo_open=True, hi_open=True), "gallery_k": Range(0, 1000),
    }


HELP = {
    **{k: TRAIN_HELP[k] for k in TRAIN_KEYS},
    "data": "labelled data: an MNIST-format .npz, an image folder with class subfolders, or a shards folder with train/ and test/",
    "normal_class": "the class (name or label) that is normal",
    "all_classes": "each class in turn as the normal one (the one-class protocol)",
    "methods": "knn (frozen features) | msc | msc-noangular",
    "out": "run folder: results.md, results.json, split files, plots/",
    "exts": "image extensions to take from a folder (e.g. jpg: the tiles' .png masks are never images)",
    "train_fraction": "fraction of the normal class that trains, for sets without a split",
    "groups": "JSON {image path: group id}: a folder's normal class split by whole groups (see msc data make-shards --groups)",
    "seed": "seed of the split (written to the run folder) and of training",
    "calibration_fraction": "normal training samples held out of the index to set the threshold",
    "target_fpr": "false-positive rate on held-out normals that the threshold is set for",
    "gallery_k": "images in each half of the highest/lowest-scored gallery",
    "epochs": "fine-tuning epochs for msc and msc-noangular",
    "use_gpu": "GPUs for training, embedding and scoring",
}
VALID_METHODS = ("knn", "msc", "msc-noangular")


@dataclass
class TestConfig:
    """``msc test``: metrics, tables and plots of an existing checkpoint + index; no training."""

    __test__ = False  # not a pytest class

    index: str | None = None
    data: str | None = None
    checkpoint: str | None = None
    normal_classes: list[str] | None = None
    out: str = os.path.join("~", "msc_runs", "test")
    name: str = "msc"
    batch_size: int = 64
    device: str = "auto"
    max_pixels: int = 64_000_000
    gallery_k: int = 6
    runtime: str = "torch"

    RANGES: ClassVar[dict[str, Range]] = {"batch_size": BATCH_RANGE, "max_pixels": MAX_PIXELS_RANGE,
                                          "gallery_k": Range(0, 1000)}


TEST_HELP = {
    "index": "index folder (the embedding job's --out) or s3://...",
    "data": "labelled shards to test on (every sample needs a .cls label), e.g. the demo set's test/",
    "checkpoint": "checkpoint or run folder (default: the one recorded in the index manifest)",
    "normal_classes": "labels or class names that are normal (default: the checkpoint's)",
    "out": "folder for results.json, results.md and plots/",
    "name": "the model's name in the tables and plots",
    "batch_size": "images per forward pass",
    "device": "auto (cuda when available) | cpu | cuda | cuda:N",
    "max_pixels": "images above this many pixels are not decoded (error)",
    "gallery_k": "images in each half of the highest/lowest-scored gallery",
    "runtime": RUNTIME_HELP,
}
