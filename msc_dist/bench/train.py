"""Images/s of the whole training step in one process: shard reading, decoding, batching,
host-to-device copy, two-view augmentation, one forward for both views, backward, optimiser."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time

import torch

from msc_dist.backbones import build_model
from msc_dist.data.demo import make_demo
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.data.shards import describe
from msc_dist.features import place
from msc_dist.train.config import TrainConfig
from msc_dist.train.loop import Stepper, decode_on_device, full_batches, loader_for, loader_view


def shard_counts(tmp: str, data: str | None, n_images: int, image_size: int, per_shard: int = 256) -> list[tuple[str, int]]:
    """(shard url, samples) of ``data``, or of ``n_images`` demo JPEGs generated under ``tmp``."""
    if data is None:
        make_demo(tmp, n_train=n_images, n_test_normal=0, n_test_defect=0, size=max(96, image_size), per_shard=per_shard)
        data = os.path.join(tmp, "train")
    return kept_counts(describe(data), LabelFilter(None))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU threads={torch.get_num_threads()}"


def bench_train(backbone: str, image_size: int, batch_size: int, device: str, steps: int, warmup: int,
                loader_workers: int, data: str | None, compile: bool = False, weights: str | None = None,
                pretrained: bool = True, synthetic: bool = False, base: TrainConfig | None = None,
                profile_dir: str | None = None, profile_steps: int = 5) -> dict:
    """``synthetic``: random uint8 batches made on the device, no loader: the step's own ceiling,
    to tell a data-starved GPU from a slow step. ``base``: the rest of the training config (loss,
    optimiser, augmentation), TrainConfig's defaults when absent. ``profile_dir``: after the timed
    steps, ``profile_steps`` more under torch.profiler, summarised there (``bench.profile``)."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(base or TrainConfig(), backbone=backbone, image_size=image_size, batch_size=batch_size,
                                  compile=compile, weights=weights)
        model = place(build_model(backbone, weights, pretrained=pretrained), dev)
        torch.backends.cudnn.benchmark = True
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        center = torch.nn.functional.normalize(torch.randn(model.dim, device=dev), dim=0)
        stepper = Stepper(cfg, model, opt, center, dev)
        extra = profile_steps if profile_dir else 0
        src = loader_view(cfg, train=True)[0]  # the side of the decoded training images the views are cut from
        if synthetic:
            g = torch.Generator(device=dev).manual_seed(0)
            fixed = [torch.randint(0, 256, (batch_size, 3, src, src), generator=g, device=dev,
                                   dtype=torch.uint8) for _ in range(4)]
            batches = (fixed[i % 4] for i in range(warmup + steps + extra))
        else:
            # Enough distinct JPEGs that the loader decodes real files throughout (it wraps around).
            counts = shard_counts(tmp, data, max(256, batch_size * 4), src, per_shard=128)
            loader = loader_for(dataclasses.replace(cfg, loader_workers=loader_workers, shuffle_buffer=64), counts,
                                LabelFilter(None), dev, train=True)
            batches = full_batches(loader, batch_size, warmup + steps + extra, set())
        for _ in range(warmup):
            stepper(next(batches).to(dev, non_blocking=True))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        last = None
        for _ in range(steps):
            last = stepper(next(batches).to(dev, non_blocking=True))
        float(last)  # wait for the device
        dt = time.perf_counter() - t0
        res = {
            "bench": "train", "backbone": backbone, "image_size": image_size, "view_source_size": src,
            "batch_size": batch_size, "device": device_name(dev), "loader_workers": loader_workers, "compile": compile,
            "steps": steps, "pretrained": pretrained, "synthetic": synthetic,
            "decode_on_device": not synthetic and decode_on_device(cfg, dev),
            "images_per_s": steps * batch_size / dt, "views_per_s": 2 * steps * batch_size / dt,
            "step_ms": 1000 * dt / steps, "torch": torch.__version__,
        }
        if profile_dir:
            from msc_dist.bench.profile import profile_steps as run_profile

            what = {k: res[k] for k in ("backbone", "image_size", "view_source_size", "batch_size", "device",
                                        "loader_workers", "compile", "synthetic", "decode_on_device")}
            try:  # the profile never costs the row its measurement
                run_profile(stepper, batches, profile_steps, dev, profile_dir, what)
            except Exception as e:  # noqa: BLE001 - reported in the row and on stderr, one line
                res["profile_error"] = f"{type(e).__name__}: {e}"
                print(f"profile failed: {res['profile_error']}", file=sys.stderr, flush=True)
    return res
