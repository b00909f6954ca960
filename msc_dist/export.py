"""``msc export``: the feature model of a checkpoint, input normalisation included, as ONNX,
OpenVINO IR or TorchScript, for deployment without this package.

The exported graph takes what the Scorer feeds its model: a batch of decoded, resized RGB images,
(B, 3, S, S) uint8 (``--input uint8``, the default) or float in [0, 1] (``--input float``), and
returns (B, D) float32 L2-normalised features. The anomaly score is then the sum of squared L2
distances to the k nearest vectors of the index (on unit vectors, 2 - 2 cos each).

The export folder holds the model file, ``center.pt``, ``config.json`` (the training config),
``export.json`` (input/output spec, model id, the check's result, the index reference) and, with
``--index``, ``index_manifest.json`` (a copy; the index files stay where they are). At export
time the exported model runs in its runtime (ONNX Runtime, OpenVINO or TorchScript) on a few
images and is compared with the PyTorch model; a difference above ``--atol`` is an error.
``write_checked`` (export and check one graph) is also what the model card's CPU runtimes
(``msc_dist.runtime``) build their cached graphs with."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from msc_dist.config import ConfigError, Range

FORMATS = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript.pt"}
# Every file of a format's model (OpenVINO IR: the graph and its weights).
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"),
               "torchscript": ("model.torchscript.pt",)}
INPUTS = ("uint8", "float")


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
}


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model."""


def export_module(model, uint8: bool = True):
    """images -> unit features: the Scorer's input scaling, then the FeatureModel (which holds the
    backbone's mean/std normalisation and the final L2 normalisation). (torch is imported here,
    not at the top: ``msc --help`` and the other verbs load this module's config only.)"""
    import torch

    class ExportModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.uint8 = model, uint8

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.float()
            if self.uint8:
                x = x / 255.0
            return self.model(x)

    return ExportModule()


def check_images(n: int, preprocess, seed: int = 0) -> np.ndarray:
    """(n, 3, S, S) uint8: demo textures, every other one with a defect, JPEG-encoded and decoded
    by the model card's ``preprocess``, as the Scorer decodes uploads."""
    from msc_dist.data.demo import add_defect, encode_jpeg, texture

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = texture(rng, max(preprocess.image_size, 64))
        if i % 2:
            img = add_defect(img, i % 3, rng)
        out.append(preprocess(encode_jpeg(img)))
    return np.stack(out).transpose(0, 3, 1, 2).copy()


def _export_onnx(module, example, path: str, opset: int) -> None:
    import warnings

    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter; the check below is the verdict
        prog = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=opset,
                                 input_names=["images"], output_names=["features"],
                                 dynamic_shapes=({0: batch},), report=False)
    prog.save(path)


def _run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["features"], {"images": x})[0]


# OpenVINO on the CPU in float32: its default precision is bf16 on CPUs that have it, which would
# not reproduce the PyTorch features.
OPENVINO_CPU = {"INFERENCE_PRECISION_HINT": "f32"}


def _export_openvino(module, example, path: str, opset: int) -> None:
    """The ONNX export (the same graph as ``--format onnx``), converted to OpenVINO IR, fp32 weights."""
    import openvino as ov

    onnx_path = path[: -len(".xml")] + ".export.onnx"
    try:
        _export_onnx(module, example, onnx_path, opset)
        ov.save_model(ov.convert_model(onnx_path), path, compress_to_fp16=False)
    finally:
        for p in (onnx_path, onnx_path + ".data"):
            if os.path.exists(p):
                os.remove(p)


def _run_openvino(path: str, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", OPENVINO_CPU)
    return np.array(compiled(x)[0])


def _export_torchscript(module, example, path: str) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(path)


def _run_torchscript(path: str, x: np.ndarray) -> np.ndarray:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but this is its file format
        m = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return m(torch.from_numpy(x)).float().numpy()


def run_exported(path: str, x: np.ndarray) -> np.ndarray:
    """Features from an exported model file in its own runtime."""
    if path.endswith(".onnx"):
        return _run_onnx(path, x)
    if path.endswith(".xml"):
        return _run_openvino(path, x)
    return _run_torchscript(path, x)


def runtime_name(fmt: str) -> str:
    """The runtime (and its version) that checks a format."""
    if fmt == "onnx":
        return f"onnxruntime {__import__('onnxruntime').__version__}"
    if fmt == "openvino":
        return f"openvino {__import__('openvino').__version__}"
    return f"torch.jit {__import__('torch').__version__}"


def write_checked(card, fmt: str, folder: str, *, uint8: bool = True, opset: int = 18, n_check: int = 4,
                  atol: float = 1e-4, log=print) -> tuple[str, float, float]:
    """Export the card's model as ``fmt`` into ``folder`` (FORMATS[fmt]), run it in its runtime on
    ``n_check`` images (a batch size other than the traced one) and compare with the card's PyTorch
    forward; ExportError above ``atol``. Returns (model file, max abs difference, export seconds)."""
    import copy

    import torch

    images = check_images(n_check, card.preprocess)
    x = images if uint8 else (images.astype(np.float32) / 255.0)
    ref = card.embed(torch.from_numpy(images))  # what the Scorer computes on CPU for these images
    # Export a plain (contiguous, CPU, float32) copy: channels_last is a speed layout, not part of
    # the model (a copy: the card's own model keeps its layout and device).
    model = copy.deepcopy(card.model).to(device="cpu", memory_format=torch.contiguous_format)
    module = export_module(model, uint8).eval()
    example = torch.from_numpy(x[: min(2, len(x))])
    path = os.path.join(folder, FORMATS[fmt])
    t0 = time.perf_counter()
    if fmt == "onnx":
        _export_onnx(module, example, path, opset)
    elif fmt == "openvino":
        _export_openvino(module, example, path, opset)
    else:
        _export_torchscript(module, example, path)
    seconds = time.perf_counter() - t0
    got = run_exported(path, x)
    if got.shape != ref.shape:
        raise ExportError(f"exported model returns {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    log(f"export check: {len(images)} images, {runtime_name(fmt)} vs PyTorch: max abs difference {diff:.2e} "
        f"(limit {atol:g})")
    if not diff <= atol:
        raise ExportError(f"the exported model differs from PyTorch by {diff:.3e} (> --atol {atol:g})")
    return path, diff, seconds


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

    index_ref, manifest_bytes = None, None
    if cfg.index:
        from msc_dist.index import MANIFEST, read_manifest
        from msc_dist.scorer import check_pair

        man, folder = read_manifest(storage.expand(cfg.index))  # the live version (or a pinned version folder), checked
        manifest_bytes = storage.read_bytes(storage.join(folder, MANIFEST))
        check_pair(man, model_id, pre)
        index_ref = {"path": folder, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "count": man.count,
                     "dimension": man.dimension, "k": man.k, "metric": man.metric, "threshold": man.threshold,
                     "target_fpr": man.target_fpr, "model_id": man.model_id}

    out = os.path.abspath(os.path.expanduser(cfg.out))
    os.makedirs(out, exist_ok=True)
    path, diff, seconds = write_checked(card, cfg.format, out, uint8=cfg.input == "uint8", opset=cfg.opset,
                                        n_check=cfg.check_images, atol=cfg.atol, log=log)
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
