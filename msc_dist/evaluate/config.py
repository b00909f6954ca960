from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    data: str | None = None
    normal_class: str | None = None
    all_classes: bool = False
    methods: list[str] = field(default_factory=lambda: ["knn", "msc", "msc-noangular"])
    out: str = os.path.join("~", "msc_runs", "eval")
    exts: list[str] | None = None
    train_fraction: float = 0.7
    seed: int = 0
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    crop_min_scale: float = 0.2
    hflip: bool = True
    num_workers: int = 1
    loader_workers: int = 2
    use_gpu: bool = False
    calibration_fraction: float = 0.1
    target_fpr: float = 0.05
    gallery_k: int = 6
    ray_address: str | None = None


HELP = {
    "data": "labelled data: an MNIST-format .npz, an image folder with class subfolders, or a shards folder with train/ and test/",
    "normal_class": "the class (name or label) that is normal",
    "all_classes": "each class in turn as the normal one (the one-class protocol)",
    "methods": "knn (frozen features) | msc | msc-noangular",
    "out": "run folder: results.md, results.json, split files, plots/",
    "exts": "image extensions to take from a folder (e.g. jpg to skip .png masks)",
    "train_fraction": "fraction of the normal class that trains, for sets without a split",
    "seed": "seed of the split (written to the run folder) and of training",
    "calibration_fraction": "normal training samples held out of the index to set the threshold",
    "target_fpr": "false-positive rate on held-out normals that the threshold is set for",
    "gallery_k": "images in each half of the highest/lowest-scored gallery",
    "backbone": "efficientnet_lite0 | resnet18 | resnet50 | resnet152",
    "weights": "backbone weights file (default: packaged / torch hub cache)",
    "image_size": "square input side in pixels",
    "epochs": "fine-tuning epochs for msc and msc-noangular",
    "batch_size": "images per worker per step",
    "lr": "SGD learning rate",
    "crop_min_scale": "smallest RandomResizedCrop area fraction of a training view (paper: 0.2)",
    "hflip": "random horizontal flips in the training views",
    "num_workers": "Ray Train workers",
    "loader_workers": "DataLoader worker processes per training worker",
    "use_gpu": "GPUs for training, embedding and scoring",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
}
VALID_METHODS = ("knn", "msc", "msc-noangular")
