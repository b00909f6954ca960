"""The training job's one typed config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from msc_dist.config import COUNT_RANGE, CPUS_RANGE, MAX_PIXELS_RANGE, SEED_RANGE, Range


@dataclass
class TrainConfig:
    # data
    data: str | None = None
    eval_data: str | None = None
    normal_classes: list[str] = field(default_factory=lambda: ["0"])
    image_size: int = 224
    resize_mode: str = "center_crop"
    loader_workers: int = 2
    shuffle_buffer: int = 256
    max_pixels: int = 64_000_000
    decode_on_device: str = "auto"
    demo_dir: str = os.path.join("~", ".cache", "msc_dist", "demo")
    # model
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    # optimisation (paper defaults; --preset fast: see PRESETS)
    preset: str = "paper"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 5e-5
    momentum: float = 0.0
    temperature: float = 0.25
    angular_weight: float = 1.0
    crop_min_scale: float = 0.2
    view_source_scale: float = 2.0
    hflip: bool = True
    global_negatives: bool = False
    compile: bool = False
    steps_per_epoch: int | None = None
    knn_k: int = 2
    # scoring of the indexes built from this run's checkpoints (recorded in each; the embedding
    # job's default): the image score and where patch features come from (msc_dist.patches)
    score_mode: str = "global"
    patch_source: str = "frozen"
    eval_every: int = 1
    collapse_cos: float = 0.95
    collapse_rise: float = 0.2
    on_collapse: str = "warn"
    seed: int = 0
    # cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    storage_path: str = os.path.join("~", "msc_runs")
    name: str = "msc"
    max_failures: int = 3
    keep_checkpoints: int = 3
    collective_timeout_s: int = 600
    ray_address: str | None = None
    # tracking (msc_dist.tracking; off by default)
    tracking_uri: str | None = None
    tracking_experiment: str = "msc"

    # Named optimisation settings, applied between the defaults and the YAML file / flags
    # (``--preset fast``). ``paper``: the paper's schedule (the defaults; its alarms only warn).
    # ``fast``: chosen by measurement on MNIST and the magnetic tiles (README, "Detection
    # quality"): the paper's final quality in at most a third of its epochs; and, for natural
    # images, where it hurt (issue 26), its collapse_rise alarm stops the run and keeps the last
    # good epoch: a limit on how far fine-tuning moves the normal features. normal_cos rose
    # 0.19-0.26 in the first epoch on every natural class and seed (ROC-AUC down by up to
    # 0.065), at most 0.159 in all six epochs on digits and on the tiles at 128 px; the tiles at
    # 64 px reach it at epoch 2 or 3 (0.9312 kept, 0.9389 after six epochs).
    # ``natural``: for natural images (photos of objects and scenes), where ``fast`` can only stop
    # at the frozen features: the paper's constant schedule at three times its lr for 0.3 of its
    # epochs, so it moves the normals about as far as ``paper`` does (normal_cos +0.09-0.13
    # against +0.10-0.14) and gives ``paper``'s ROC-AUC within 0.0013 on every natural class,
    # digit and the tiles; the same collapse limit guards it. The default stays ``paper``.
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"epochs": 20, "lr": 1e-5, "lr_schedule": "constant", "warmup_epochs": 0.0, "momentum": 0.0,
                  "collapse_rise": 0.2, "on_collapse": "warn"},
        "fast": {"epochs": 6, "lr": 1e-3, "lr_schedule": "cosine", "warmup_epochs": 1.0, "momentum": 0.0,
                 "collapse_rise": 0.17, "on_collapse": "stop"},
        "natural": {"epochs": 6, "lr": 3e-5, "lr_schedule": "constant", "warmup_epochs": 0.0, "momentum": 0.0,
                    "collapse_rise": 0.17, "on_collapse": "stop"},
    }
    # Valid ranges, checked before Ray starts (msc_dist.config.check_ranges); what depends on the
    # cluster (image size x batch x workers against its memory) is checked right after connecting.
    RANGES: ClassVar[dict[str, Range]] = {
        "image_size": Range(16, 4096), "loader_workers": Range(0, 64), "shuffle_buffer": Range(0, 1_000_000),
        "max_pixels": MAX_PIXELS_RANGE, "epochs": Range(0, 10_000), "batch_size": Range(2, 65_536),
        "lr": Range(0, 10, lo_open=True), "warmup_epochs": Range(0, 10_000), "weight_decay": Range(0, 1),
        "momentum": Range(0, 1, hi_open=True), "temperature": Range(0, 100, lo_open=True),
        "angular_weight": Range(0, 100), "crop_min_scale": Range(0, 1, lo_open=True),
        "view_source_scale": Range(1, 4), "steps_per_epoch": Range(1, 10_000_000), "knn_k": Range(1, 1000),
        "eval_every": Range(1, 10_000), "collapse_cos": Range(-1, 1), "collapse_rise": Range(0, 2), "seed": SEED_RANGE,
        "num_workers": COUNT_RANGE, "cpus_per_worker": CPUS_RANGE, "max_failures": Range(-1, 1000),
        "keep_checkpoints": Range(1, 1000), "collective_timeout_s": Range(1, 86_400),
    }


LR_SCHEDULES = ("constant", "cosine")
ON_COLLAPSE = ("warn", "stop")


HELP = {
    "data": "normal training shards: folder, brace pattern or s3://... (none: generate and use the demo set)",
    "eval_data": "labelled shards for per-epoch ROC-AUC (kNN to the normal training features)",
    "normal_classes": "labels (ints or class names from shards.json) that count as normal",
    "image_size": "square input side in pixels",
    "resize_mode": "center_crop | squash: how every embedded image (center, kNN bank, evaluation, embedding job, scoring, serving) becomes S x S: center_crop resizes the shorter side to S*256/224 and takes the central S x S (the paper's); squash resizes the whole image to S x S (nothing cut off; aspect ratio lost). Training views are random crops of the whole image either way. Recorded in the checkpoint: indexes and servers use the checkpoint's mode",
    "loader_workers": "loader workers per training worker: DataLoader worker processes on a GPU, decode threads of the training process on a CPU (the same batches in the same order; 0: decode in the step's own thread)",
    "shuffle_buffer": "per-loader-worker shuffle buffer (samples)",
    "max_pixels": "images above this many pixels are skipped as corrupt (decompression bombs)",
    "decode_on_device": "auto | on | off: loader workers hand encoded bytes and JPEGs are decoded and resized in batches on the training device (auto: on GPUs)",
    "demo_dir": "where the demo set is generated when --data is absent",
    "backbone": "efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 | resnet18 | resnet50 | resnet152",
    "weights": "backbone weights file (state_dict); default: the packaged / torch hub cache weights",
    "epochs": "training epochs (epoch 0 = frozen features, evaluated before training)",
    "batch_size": "images per worker per step (each gives two views)",
    "preset": "paper | fast | natural: named optimisation settings applied before the YAML file and the flags (paper: 20 epochs, lr 1e-5, constant; fast, for digits, tiles and other inspection images: 6 epochs, lr 1e-3, warm-up and cosine decay, and collapse_rise 0.17 with on_collapse stop, so a run whose normal features move too far keeps its last good epoch; natural, for photos of objects and scenes: 6 epochs at a constant 3e-5 with the same stop; the README's Detection quality section has each measured on each kind of data)",
    "lr": "SGD learning rate (the peak, with a schedule)",
    "lr_schedule": "constant | cosine: cosine decays the learning rate to 0 at the last step (after the warm-up)",
    "warmup_epochs": "epochs (fractions allowed) of linear warm-up from 0 to --lr",
    "weight_decay": "SGD weight decay",
    "momentum": "SGD momentum (the paper uses none)",
    "temperature": "contrastive temperature",
    "angular_weight": "weight of the angular center loss (0 turns it off)",
    "crop_min_scale": "smallest RandomResizedCrop area fraction of a view (paper: 0.2)",
    "view_source_scale": "training images are decoded (squashed) at this multiple of image_size and the random crops of the views are taken from that, so a small crop is not an upscaled blur (the paper crops the full-size image); 1: crops of the image_size square. The README's Detection quality section measures 1 against 2",
    "hflip": "random horizontal flips in the views (turn off where orientation matters: digits, text)",
    "global_negatives": "contrast against the other ranks' features too (gathered with gradients)",
    "compile": "torch.compile the backbone (worth it on GPUs for long runs)",
    "steps_per_epoch": "cap on optimiser steps per epoch (default: one pass over the data)",
    "knn_k": "neighbours in the kNN score",
    "score_mode": "global | patch | combined: the image score of the indexes built from this checkpoint (recorded in it; "
                  "the embedding job's default, its --score-mode wins): global, the kNN of the pooled feature; patch, the "
                  "anomaly map's maximum; combined, both over their calibrated thresholds, summed",
    "patch_source": "frozen | msc: the patch features of those indexes, from the ImageNet trunk or the fine-tuned one "
                    "(recorded in the checkpoint; the embedding job's default)",
    "eval_every": "evaluate every N epochs",
    "collapse_cos": "collapse alarm in [-1, 1]: the mean pairwise cosine of the training views' features (logged per epoch as feature_cos, with the mean ||z - c|| as zc_norm) at or above this means the features collapsed",
    "collapse_rise": "collapse alarm relative to the start, in [0, 2] (0: off): the mean pairwise cosine of the normal training images' features, embedded unaugmented as at epoch 0 (logged as normal_cos; shares the evaluation's pass, else costs one forward pass over the normal set per epoch), risen by this much or more over its epoch-0 value means training is collapsing them. Needs no anomalies",
    "on_collapse": "warn | stop: what a collapse alarm does (stop: training ends at that epoch; its checkpoint is kept apart in the run folder's collapsed/ and not registered, so the run's checkpoint stays the last good epoch's)",
    "seed": "seed for shuffling and augmentation",
    "num_workers": "Ray Train workers (DDP ranks)",
    "use_gpu": "one GPU per worker, NCCL; otherwise CPU and gloo",
    "cpus_per_worker": "CPUs reserved per worker",
    "placement_strategy": "PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (STRICT_SPREAD: one worker per node)",
    "storage_path": "run storage: folder or s3://bucket/prefix",
    "name": "run name; rerunning with the same storage path and name resumes",
    "max_failures": "worker-group restarts before the run fails",
    "keep_checkpoints": "checkpoints kept (newest)",
    "collective_timeout_s": "seconds a collective (all-reduce, barrier) waits for a stalled rank before the worker group fails and restarts (torch's default: 1800)",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray started in-process)",
    "tracking_uri": "log the run to MLflow (default: off): sqlite:///PATH.db or file:PATH (local stores, relative paths allowed; one node only) or http(s)://HOST:PORT (a tracking server). Rank 0 logs the config as params, each epoch's metrics, the checkpoint (tag msc.checkpoint), config.json and the training curves; a resumed run continues its MLflow run. Needs pip install 'msc-dist[tracking]'",
    "tracking_experiment": "the MLflow experiment the run is logged in (created when missing)",
}
