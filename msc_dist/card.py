"""The model card: what loading a checkpoint gives every path that embeds images.

One object holds the feature model (backbone and weights, on its device), the model id (sha256
of model.pt), the center, the checkpoint's config and its ``Preprocess`` (image size, resize
mode, normalisation): how an image becomes this model's input. The center pass and evaluation
(training), the embedding and score actors, the Scorer, both serving layouts and ``msc
predict/test/export`` all take their preprocessing from here, so none of them has a default
size or resize mode that could differ from the checkpoint's.

    card = load_card(checkpoint_or_run_folder, device="cpu")
    x = card.preprocess(encoded_bytes)          # (S, S, 3) uint8
    z = card.embed_arrays(np.stack([x]))        # (1, D) float32 unit vectors

The batch forward runs in the card's ``runtime`` (``msc_dist.runtime``): PyTorch (the default
here), or on a CPU the checkpoint's checked export in ONNX Runtime or OpenVINO
(``load_card(url, "cpu", runtime="auto")``). The PyTorch model stays on the card either way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from msc_dist import checkpoint as ckpt
from msc_dist.backbones import FeatureModel, build_model, get_spec
from msc_dist.data.decode import Preprocess
from msc_dist.features import autocast, embed_images, place, unit_input
from msc_dist.patches import PatchExtractor, PatchSpec

# Checkpoints written before ``resize_mode`` existed were trained and embedded on squashed
# images: the one place where that history is written down.
LEGACY_RESIZE_MODE = "squash"


def preprocess_of(config: dict[str, Any]) -> Preprocess:
    """The ``Preprocess`` of a checkpoint's (or a training run's) config."""
    spec = get_spec(config["backbone"])
    return Preprocess(int(config["image_size"]), str(config.get("resize_mode") or LEGACY_RESIZE_MODE),
                      tuple(spec.mean), tuple(spec.std))


def index_record(checkpoint: str, config: dict[str, Any]) -> dict[str, Any]:
    """What an index manifest records of the checkpoint that built it (``check_pair`` reads it back)."""
    pre = preprocess_of(config)
    return {"checkpoint": checkpoint, "backbone": config["backbone"], "image_size": pre.image_size,
            "resize_mode": pre.resize_mode, "preprocess": pre.to_dict()}


@dataclass
class ModelCard:
    checkpoint: str  # the resolved checkpoint folder
    model_id: str  # sha256 of model.pt
    config: dict[str, Any]  # the resolved TrainConfig the checkpoint was trained with
    meta: dict[str, Any]
    center: torch.Tensor  # (D,) float32, on CPU
    preprocess: Preprocess
    model: FeatureModel  # eval mode, on ``device``, channels_last
    device: torch.device
    runtime: str = "torch"  # what runs ``embed``: torch | onnxruntime | openvino
    forward: Callable[[np.ndarray], np.ndarray] | None = None  # a CPU runtime's forward; None: PyTorch
    threads: int | None = None  # a CPU runtime's threads
    graph: Any = None  # a CPU runtime's ``runtime.Loaded`` (its cache folder; built or reused)
    cache: str | None = None  # a CPU runtime's graph cache (msc_dist.runtime.cache_root)
    _patch_graphs: dict = field(default_factory=dict, repr=False)  # PatchSpec -> a CPU runtime's Loaded
    _patch: dict = field(default_factory=dict, repr=False)  # PatchSpec -> its PatchExtractor
    _patch_lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def backbone(self) -> str:
        return str(self.config["backbone"])

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """The batch forward: (B, 3, S, S) uint8 at this card's size -> (B, D) float32 unit vectors."""
        self._check_size(images)
        if self.forward is not None:
            return self.forward(_uint8(images))
        return self.embed_torch(images)

    def embed_torch(self, images) -> np.ndarray:
        """``embed`` in PyTorch whatever the runtime (the reference a CPU runtime's graph is checked against)."""
        return embed_images(self.model, torch.as_tensor(images), self.device).numpy()

    def patch_extractor(self, spec: PatchSpec | None = None) -> PatchExtractor:
        """The extractor of ``spec`` (default: the backbone's ``PatchSpec.default``): hooks on this
        card's model (source msc) or on the backbone's ImageNet model (source frozen), built once."""
        spec = spec or PatchSpec.default(self.backbone)
        with self._patch_lock:
            if spec not in self._patch:
                if spec.source == "msc":
                    model = self.model
                else:
                    model = place(build_model(self.backbone), self.device).eval()
                self._patch[spec] = PatchExtractor(model, spec)
            return self._patch[spec]

    def embed_with_patches(self, images, spec: PatchSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) uint8 -> (z (B, D) float32 unit vectors, patches (B, h, w, C) float32), z
        exactly ``embed``'s. In a CPU runtime both come from one run of one graph, the checkpoint's
        export with a ``patches`` output (``runtime.load(..., patch_spec=)``: built and checked
        against ``embed_with_patches_torch`` the first time, then cached); else from PyTorch."""
        self._check_size(images)
        if self.forward is None:
            return self.embed_with_patches_torch(images, spec)
        spec = spec or PatchSpec.default(self.backbone)
        with self._patch_lock:
            loaded = self._patch_graphs.get(spec)
        if loaded is None:
            from msc_dist import runtime as rt

            loaded = rt.load(self, self.runtime, self.cache, self.threads, patch_spec=spec)
            with self._patch_lock:
                loaded = self._patch_graphs.setdefault(spec, loaded)
        return loaded.forward(_uint8(images))

    @torch.no_grad()
    def embed_with_patches_torch(self, images, spec: PatchSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``embed_with_patches`` in PyTorch whatever the runtime. Source msc: ONE forward gives
        both (hooks on the trunk's stages). Source frozen: z from ``embed_torch``, the patches from
        one forward of the frozen ImageNet trunk."""
        self._check_size(images)
        ext = self.patch_extractor(spec)
        x = torch.as_tensor(images)
        with autocast(self.device):
            if ext.model is self.model:
                z, p = ext(unit_input(x, self.device))
                return z.float().cpu().numpy(), p.cpu().numpy()
            z = self.embed_torch(x)
            _, p = ext(unit_input(x, self.device))
        return z, p.cpu().numpy()

    def embed_arrays_with_patches(self, arrays, spec: PatchSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 rows -> ``embed_with_patches``."""
        x = np.stack(arrays) if isinstance(arrays, list) else np.asarray(arrays)
        return self.embed_with_patches(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2), spec)

    def _check_size(self, images) -> None:
        if images.shape[-2:] != (self.preprocess.image_size, self.preprocess.image_size):
            raise ValueError(f"images of {tuple(images.shape[-2:])} given to a model that takes "
                             f"{self.preprocess.image_size} px ({self.preprocess.resize_mode}): decode with its card")

    def embed_arrays(self, arrays: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(B, S, S, 3) uint8 rows, as ``preprocess`` and the Ray Data jobs hold them -> (B, D)."""
        x = np.stack(arrays) if isinstance(arrays, list) else np.asarray(arrays)
        if self.forward is not None:
            return self.embed(x.transpose(0, 3, 1, 2))
        return self.embed(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2))

    def info(self) -> dict[str, Any]:
        """What API clients may see (no storage URIs)."""
        return {"model_id": self.model_id, "backbone": self.backbone, "image_size": self.preprocess.image_size,
                "resize_mode": self.preprocess.resize_mode, "dimension": self.dim,
                "preprocess": self.preprocess.to_dict(), "runtime": self.runtime}


def _uint8(images) -> np.ndarray:
    x = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
    return np.ascontiguousarray(x, dtype=np.uint8)


def load_card(url: str, device: str | torch.device = "cpu", runtime: str = "torch", *, cache: str | None = None,
              threads: int | None = None) -> ModelCard:
    """The card of a checkpoint folder, or of the checkpoint a run folder registered last
    (``checkpoint.resolve``); every file checked against its sha256 (``checkpoint.load``).
    ``runtime``: what runs its batch forward (``msc_dist.runtime``: torch | onnxruntime | openvino
    | auto); a CPU runtime's graph is built into (or reused from) ``cache``, run on ``threads``."""
    from msc_dist import runtime as rt

    chosen = rt.resolve(runtime, device)  # before any loading: a wrong runtime fails at once
    path = ckpt.resolve(url)
    ck = ckpt.load(path)
    model = build_model(ck.config["backbone"], pretrained=False)  # every tensor comes from model.pt
    model.load_state_dict(ck.model_state)
    dev = torch.device(device)
    card = ModelCard(path, ck.model_id, ck.config, ck.meta, ck.center.float(), preprocess_of(ck.config),
                     place(model, dev).eval(), dev)
    if chosen != "torch":
        loaded = rt.load(card, chosen, cache, threads)
        card.runtime, card.forward, card.threads, card.graph = chosen, loaded.forward, loaded.threads, loaded
        card.cache = cache
    return card
