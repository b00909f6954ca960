"""Typed configs of the data commands (``msc data ...`` / ``python -m msc_dist.data ...``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from msc_dist.config import SEED_RANGE, Range


@dataclass
class MakeShardsConfig:
    src: str | None = field(default=None, metadata={"flag": "--from"})
    out: str | None = None
    exts: list[str] | None = None
    per_shard: int = 1000
    normal_class: str | None = None
    train_fraction: float = 0.7
    seed: int = 0
    masks: bool = True
    groups: str | None = None

    RANGES: ClassVar[dict[str, Range]] = {"per_shard": Range(1, 10_000_000),
                                          "train_fraction": Range(0, 1, lo_open=True, hi_open=True), "seed": SEED_RANGE}


MAKE_SHARDS_HELP = {
    "src": "DIR with class subfolders, or an MNIST-format .npz (required)",
    "out": "DIR or s3://bucket/prefix (required)",
    "exts": "image extensions to take; default: jpg jpeg png webp (a NAME.png beside NAME.jpg is a mask, never an image)",
    "per_shard": "samples per shard",
    "normal_class": "write OUT/train (normal only) and OUT/test; folders get a seeded split",
    "train_fraction": "fraction of the normal class that trains, for folders",
    "seed": "seed of the split",
    "masks": "pack NAME.png beside an image NAME.jpg|jpeg|webp as its pixel mask (KEY.mask.png, white = defect)",
    "groups": "JSON {image path relative to --from: group id}: split the normal class by whole groups (the photos of "
              "one part together), so no part is both in the bank and in test; every normal image needs a group",
}


@dataclass
class DemoConfig:
    out: str | None = None
    n_train: int = 512
    n_test_normal: int = 128
    n_test_defect: int = 128
    size: int = 96
    seed: int = 0

    # 0 is valid: a set with no test images (gpu-check's training data) or no training images.
    RANGES: ClassVar[dict[str, Range]] = {"n_train": Range(0, 10_000_000), "n_test_normal": Range(0, 10_000_000),
                                          "n_test_defect": Range(0, 10_000_000), "size": Range(16, 4096), "seed": SEED_RANGE}


DEMO_HELP = {"out": "output folder (required): OUT/train and OUT/test", "n_train": "normal training images",
             "n_test_normal": "normal test images", "n_test_defect": "defective test images",
             "size": "image side in pixels", "seed": "seed of the generator"}


@dataclass
class DescribeConfig:
    data: str | None = field(default=None, metadata={"positional": True})


DESCRIBE_HELP = {"data": "shards: folder, brace pattern, glob or s3://..."}

COMMANDS = {
    "make-shards": (MakeShardsConfig, MAKE_SHARDS_HELP, "image folder (subfolders = classes) or MNIST npz -> shards"),
    "demo": (DemoConfig, DEMO_HELP, "generate the embedded demo set (procedural textures with defects)"),
    "describe": (DescribeConfig, DESCRIBE_HELP, "shard counts and labels"),
}
