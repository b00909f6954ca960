"""``msc export``: the feature model of a checkpoint, input normalisation included, as ONNX,
OpenVINO IR or TorchScript, for deployment without this package.

The exported graph takes what the Scorer feeds its model: a batch of decoded, resized RGB images,
(B, 3, S, S) uint8 (``--input uint8``, the default) or float in [0, 1] (``--input float``), and
returns (B, D) float32 L2-normalised features. The anomaly score is then the sum of squared L2
distances to the k nearest vectors of the index (on unit vectors, 2 - 2 cos each). ``--patches``
adds the output ``patches`` (B, h, w, C), the patch features of the anomaly maps (the PatchSpec
of ``--index``'s bank, else the backbone's default with the checkpoint's patch_source).

The export folder holds the model file, ``center.pt``, ``config.json`` (the training config),
``export.json`` (input/output spec, model id, the check's result, the index reference) and, with
``--index``, ``index_manifest.json`` (a copy; the index files stay where they are). At export
time the exported model runs in its runtime (ONNX Runtime, OpenVINO or TorchScript) on a few
images and is compared with the PyTorch model; a difference above ``--atol`` is an error.
The graphs themselves are built and checked by ``msc_dist.graph.write_checked``, which the model
card's CPU runtimes (``msc_dist.runtime``) build their cached graphs with too."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import ClassVar

from msc_dist.config import ConfigError, Range
from msc_dist.graph import (FORMATS, INPUTS, MODEL_FILES, ExportError, check_images, run_exported,  # noqa: F401
                            runtime_name, write_checked)


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    format: str = "onnx"
    out: str | None = None
    index: str | None = None
    input: str = "uint8"
    check_images: int = 4
    atol: float = 1e-4
    opset: int = 18
    patches: bool = False

    RANGES: ClassVar[dict[str, Range]] = {"check_images": Range(1, 1024), "atol": Range(0, 1, lo_open=True),
                                          "opset": Range(11, 23)}


HELP = {
    "checkpoint": "checkpoint folder, or a run folder (its newest checkpoint); local or s3://",
    "format": "onnx | openvino (IR: model.xml + model.bin, fp32) | torchscript",
    "out": "export folder (created; files in it are replaced)",
    "index": "index folder whose manifest the export references (checked against the checkpoint's model id)",
    "input": "uint8: (B, 3, S, S) uint8 RGB as decoded | float: (B, 3, S, S) float in [0, 1]",
    "check_images": "images the exported model is checked on against PyTorch",
    "atol": "largest absolute feature difference to PyTorch that the check accepts",
    "opset": "ONNX opset version",
    "patches": "the graph also outputs `patches` (B, h, w, C), the patch features of the anomaly maps: those of "
               "--index's patch bank (its stages, pool and source) when it has one, else the backbone's defaults "
               "with the checkpoint's patch_source (msc: the checkpoint's own trunk, the same forward; frozen: the "
               "ImageNet trunk, a second forward in the graph)",
}


def _patch_spec(cfg: ExportConfig, card, man):
    """--patches: the PatchSpec of --index's bank, else the backbone's default with the
    checkpoint's recorded patch_source (frozen when it records none)."""
    from msc_dist.patches import PatchError, PatchSpec

    try:
        if man is not None and man.patch:
            return PatchSpec.from_dict(man.patch)
        return PatchSpec.default(card.backbone, source=card.config.get("patch_source") or "frozen")
    except PatchError as e:
        raise ConfigError(str(e)) from None


@dataclass
class ExportOutcome:
    out: str
    model_file: str
    max_abs_diff: float
    spec: dict


def main(cfg: ExportConfig, log=print) -> ExportOutcome:
    import torch

    from msc_dist import storage
    from msc_dist.card import load_card

    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("--checkpoint and --out are required")
    if cfg.format not in FORMATS:
        raise ConfigError(f"unknown format {cfg.format!r}; valid: {sorted(FORMATS)}")
    if cfg.input not in INPUTS:
        raise ConfigError(f"unknown input {cfg.input!r}; valid: {list(INPUTS)}")
    if cfg.check_images < 1:
        raise ConfigError(f"check_images must be at least 1, got {cfg.check_images}")
    card = load_card(storage.expand(cfg.checkpoint), "cpu")
    ck_url, center, config, model_id = card.checkpoint, card.center, card.config, card.model_id
    pre = card.preprocess
    size, dim = pre.image_size, card.dim

    index_ref, manifest_bytes, man = None, None, None
    if cfg.index:
        from msc_dist.index import MANIFEST, read_manifest
        from msc_dist.scorer import check_pair

        man, folder = read_manifest(storage.expand(cfg.index))  # the live version (or a pinned version folder), checked
        manifest_bytes = storage.read_bytes(storage.join(folder, MANIFEST))
        check_pair(man, model_id, pre)
        index_ref = {"path": folder, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "count": man.count,
                     "dimension": man.dimension, "k": man.k, "metric": man.metric, "threshold": man.threshold,
                     "target_fpr": man.target_fpr, "model_id": man.model_id}

    pspec = _patch_spec(cfg, card, man) if cfg.patches else None
    out = os.path.abspath(os.path.expanduser(cfg.out))
    os.makedirs(out, exist_ok=True)
    patch_check: dict = {}
    path, diff, seconds = write_checked(card, cfg.format, out, uint8=cfg.input == "uint8", opset=cfg.opset,
                                        n_check=cfg.check_images, atol=cfg.atol, log=log, patch_spec=pspec,
                                        report=patch_check)
    runtime = runtime_name(cfg.format)

    torch.save(center.detach().float().cpu(), os.path.join(out, "center.pt"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if manifest_bytes is not None:
        with open(os.path.join(out, "index_manifest.json"), "wb") as f:
            f.write(manifest_bytes)
    elif os.path.exists(os.path.join(out, "index_manifest.json")):
        os.remove(os.path.join(out, "index_manifest.json"))
    spec = {
        "format": cfg.format, "file": FORMATS[cfg.format], "checkpoint": ck_url, "model_id": model_id,
        "backbone": config["backbone"], "image_size": size, "dimension": dim,
        "input": {"name": "images", "shape": ["batch", 3, size, size], "layout": "NCHW, RGB",
                  "dtype": "uint8" if cfg.input == "uint8" else "float32",
                  "range": "0..255" if cfg.input == "uint8" else "0..1",
                  "resize_mode": pre.resize_mode, "preprocess": pre.describe()},
        "output": {"name": "features", "shape": ["batch", dim], "dtype": "float32", "note": "L2-normalised"},
        "patches": None if pspec is None else {
            "name": "patches", "shape": ["batch", *patch_check["patch_shape"]], "dtype": "float32", "spec": pspec.to_dict(),
            "note": "the anomaly map: per patch, the Euclidean distance to the nearest patch of the bank "
                    "(msc_dist.patches.nearest, anomaly_map)",
            "check": {"max_abs_diff": patch_check["patch_max_abs_diff"], "scale": patch_check["patch_scale"]}},
        "normalization": {"mean": list(pre.mean), "std": list(pre.std), "inside_model": True},
        "score": "sum over the k nearest index vectors of the squared L2 distance (2 - 2 cos on unit vectors)",
        "preprocessing": pre.to_dict(), "center": "center.pt", "index": index_ref,
        "check": {"images": cfg.check_images, "runtime": runtime, "max_abs_diff": diff, "atol": cfg.atol},
        "export_seconds": seconds, "torch": torch.__version__,
    }
    if cfg.format in ("onnx", "openvino"):
        spec["opset"] = cfg.opset
    if cfg.format == "openvino":
        spec["files"] = list(MODEL_FILES["openvino"])
    for fmt, files in MODEL_FILES.items():  # one model per export folder
        for other in files if fmt != cfg.format else ():
            if os.path.exists(os.path.join(out, other)):
                os.remove(os.path.join(out, other))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(spec, f, indent=1)
    return ExportOutcome(out, path, diff, spec)
