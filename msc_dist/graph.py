"""Exported graphs of a model card: the feature model with its input scaling as ONNX, OpenVINO IR or
TorchScript, and the check that an exported graph reproduces the card's PyTorch forward.

``write_checked`` exports one graph and checks it in its own runtime; ``msc export``
(``msc_dist.export``) and the card's CPU runtimes (``msc_dist.runtime``, which caches the graphs)
both build through it. Nothing here loads a checkpoint: the card is passed in."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

FORMATS = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript.pt"}
# Every file of a format's model (OpenVINO IR: the graph and its weights).
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"),
               "torchscript": ("model.torchscript.pt",)}
INPUTS = ("uint8", "float")


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model."""



_CORE: list = []  # one OpenVINO Core per process, never destroyed
_CORE_LOCK = threading.Lock()


def openvino_core():
    """The process's OpenVINO Core, for its whole life, as OpenVINO recommends: a Core per graph
    loads and unloads the CPU plugin with each, and a later fork of the process (subprocess, Ray)
    then died of SIGSEGV (seen in the full test suite after many graphs were built and dropped)."""
    import openvino as ov

    with _CORE_LOCK:
        if not _CORE:
            _CORE.append(ov.Core())
        return _CORE[0]

def export_module(model, uint8: bool = True, patch_model=None, patch_spec=None):
    """images -> unit features: the Scorer's input scaling, then the FeatureModel (which holds the
    backbone's mean/std normalisation and the final L2 normalisation). With ``patch_spec``, a
    second output: the (B, h, w, C) patch features of ``patch_model``'s trunk stages
    (``msc_dist.patches.aggregate``, as ``PatchExtractor`` gives them), ``patch_model`` being
    ``model`` itself (source msc: one forward gives both) or the frozen ImageNet model (source
    frozen: a second forward in the same graph). (torch is imported here, not at the top:
    ``msc --help`` and the other verbs load this module's config only.)"""
    import torch

    from msc_dist.patches import PatchError, aggregate, stage_names

    class ExportModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.uint8 = model, uint8
            self.patch_model = None if patch_spec is None or patch_model is model else patch_model
            self.names, self.feats = [], {}
            if patch_spec is not None:
                source = patch_model if patch_model is not None else model
                self.names = stage_names(source.spec.name, patch_spec.stages)
                modules = dict(source.trunk.named_modules())
                missing = [n for n in self.names if n not in modules]
                if missing:
                    raise PatchError(f"{source.spec.name} has no trunk stage(s) {missing}")
                for n in self.names:
                    modules[n].register_forward_hook(self._keep(n))

        def _keep(self, name: str):
            def hook(_module, _inp, out):
                self.feats[name] = out

            return hook

        def forward(self, images: torch.Tensor):
            x = images.float()
            if self.uint8:
                x = x / 255.0
            z = self.model(x)
            if not self.names:
                return z
            if self.patch_model is not None:
                self.patch_model(x)
            return z, aggregate([self.feats[n] for n in self.names], patch_spec.pool, patch_spec.norm)

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
    outputs = ["features", "patches"] if module.names else ["features"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter; the check below is the verdict
        prog = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=opset,
                                 input_names=["images"], output_names=outputs,
                                 dynamic_shapes=({0: batch},), report=False)
    prog.save(path)


def _one_or_two(outs: list) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    return outs[0] if len(outs) == 1 else (outs[0], outs[1])


def _run_onnx(path: str, x: np.ndarray):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _one_or_two(sess.run(None, {"images": x}))


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


def _run_openvino(path: str, x: np.ndarray):
    import openvino as ov

    compiled = openvino_core().compile_model(path, "CPU", OPENVINO_CPU)
    res = compiled(x)
    return _one_or_two([np.array(res[o]) for o in compiled.outputs])


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
        out = m(torch.from_numpy(x))
    return _one_or_two([t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))])


def run_exported(path: str, x: np.ndarray):
    """Features from an exported model file in its own runtime: (B, D), or (features, patches)
    for a graph exported with patch features."""
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
                  atol: float = 1e-4, log=print, patch_spec=None, report: dict | None = None) -> tuple[str, float, float]:
    """Export the card's model as ``fmt`` into ``folder`` (FORMATS[fmt]), run it in its runtime on
    ``n_check`` images (a batch size other than the traced one) and compare with the card's PyTorch
    forward; ExportError above ``atol``. Returns (model file, max abs difference, export seconds).
    ``patch_spec``: the graph also outputs ``patches``, the patch features of that PatchSpec
    (``ModelCard.embed_with_patches``), checked against PyTorch relative to their scale (their
    largest absolute difference divided by max(1, their largest magnitude), within ``atol``);
    ``report`` then gets ``patch_max_abs_diff``, ``patch_scale`` and ``patch_shape``."""
    import copy

    import torch

    images = check_images(n_check, card.preprocess)
    x = images if uint8 else (images.astype(np.float32) / 255.0)
    ref = card.embed_torch(torch.from_numpy(images))  # what the Scorer computes in PyTorch for these images
    ref_p = None
    if patch_spec is not None:
        ref_p = card.embed_with_patches_torch(torch.from_numpy(images), patch_spec)[1]
    # Export a plain (contiguous, CPU, float32) copy: channels_last is a speed layout, not part of
    # the model (a copy: the card's own model keeps its layout and device).
    def plain(m):  # ... without the forward hooks of the card's PatchExtractors (the export adds its own)
        m = copy.deepcopy(m).to(device="cpu", memory_format=torch.contiguous_format).eval()
        for sub in m.modules():
            sub._forward_hooks.clear()
        return m

    model = plain(card.model)
    patch_model = None
    if patch_spec is not None:
        source = card.patch_extractor(patch_spec).model  # the card's own model (msc) or the ImageNet one (frozen)
        patch_model = model if source is card.model else plain(source)
    module = export_module(model, uint8, patch_model, patch_spec).eval()
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
    if ref_p is not None:
        got, got_p = got
        if got_p.shape != ref_p.shape:
            raise ExportError(f"exported patches are {got_p.shape}, PyTorch's {ref_p.shape}")
        scale = max(1.0, float(np.abs(ref_p).max()))
        pdiff = float(np.abs(got_p - ref_p).max())
        log(f"export check: patches {tuple(got_p.shape[1:])}, max abs difference {pdiff:.2e} at scale {scale:.1f}")
        if not pdiff / scale <= atol:
            raise ExportError(f"the exported patch features differ from PyTorch by {pdiff:.3e} at scale {scale:.3g} "
                              f"(> --atol {atol:g} of it)")
        if report is not None:
            report.update(patch_max_abs_diff=pdiff, patch_scale=scale, patch_shape=list(got_p.shape[1:]))
    if got.shape != ref.shape:
        raise ExportError(f"exported model returns {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    log(f"export check: {len(images)} images, {runtime_name(fmt)} vs PyTorch: max abs difference {diff:.2e} "
        f"(limit {atol:g})")
    if not diff <= atol:
        raise ExportError(f"the exported model differs from PyTorch by {diff:.3e} (> --atol {atol:g})")
    return path, diff, seconds
