"""Exported graphs of a model card: the feature model with its input scaling as ONNX, OpenVINO IR or
TorchScript, and the check that an exported graph reproduces the card's PyTorch forward.

``write_checked`` exports one graph and checks it in its own runtime; ``msc export``
(``msc_dist.export``) and the card's CPU runtimes (``msc_dist.runtime``, which caches the graphs)
both build through it. Nothing here loads a checkpoint: the card is passed in."""

from __future__ import annotations

import os
import time

import numpy as np

FORMATS = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript.pt"}
# Every file of a format's model (OpenVINO IR: the graph and its weights).
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"),
               "torchscript": ("model.torchscript.pt",)}
INPUTS = ("uint8", "float")


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
