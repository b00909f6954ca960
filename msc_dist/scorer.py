"""Model + index -> anomaly scores. Shared by offline scoring and serving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from msc_dist.checkpoint import load_model, resize_mode, resolve
from msc_dist.data.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, BadImage, decode_image
from msc_dist.features import embed_images
from msc_dist.index import IndexMismatch, ShardedIndex, load_index


@dataclass
class ScoreResult:
    score: float | None
    is_anomaly: bool | None
    threshold: float | None
    neighbors: list[dict]  # [{"id": str, "distance": float}] nearest first (squared L2)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"score": self.score, "is_anomaly": self.is_anomaly, "threshold": self.threshold,
                "neighbors": self.neighbors, **({"error": self.error} if self.error else {})}


class Scorer:
    """``checkpoint`` None (the default): the checkpoint recorded in the index manifest, i.e. the
    one the index was built with; one given must have built the index (same model id)."""

    def __init__(self, checkpoint: str | None = None, index: str | ShardedIndex | None = None, device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, use_gpu_index: bool = False,
                 formats: tuple[str, ...] = DEFAULT_FORMATS):
        if index is None:
            raise ValueError("Scorer needs an index (the embedding job's --out)")
        self.device = torch.device(device)
        self.index = index if isinstance(index, ShardedIndex) else load_index(index, None, use_gpu_index)
        checkpoint = checkpoint or self.index.manifest.extra.get("checkpoint")
        if not checkpoint:
            raise IndexMismatch("the index manifest names no checkpoint; pass one")
        self.checkpoint = resolve(checkpoint)
        self.model, self.center, self.config, self.model_id = load_model(self.checkpoint, self.device)
        if self.index.manifest.model_id != self.model_id:
            raise IndexMismatch(f"index model_id {self.index.manifest.model_id[:12]}… does not match checkpoint "
                                f"{self.model_id[:12]}…: the index was built with another model; rebuild it with "
                                "python -m msc_dist.embed, or leave the checkpoint out to use the index's own")
        self.image_size = int(self.config["image_size"])
        self.resize_mode = resize_mode(self.config)
        self.max_pixels = max_pixels
        self.formats = tuple(formats)

    @property
    def threshold(self) -> float | None:
        return self.index.manifest.threshold

    def info(self) -> dict:
        m = self.index.manifest
        return {"model_id": self.model_id, "backbone": self.config["backbone"], "image_size": self.image_size,
                "resize_mode": self.resize_mode, "index_size": m.count, "dimension": m.dimension, "k": m.k, "threshold": m.threshold,
                "target_fpr": m.target_fpr}  # no storage URIs: this goes to API clients

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, D) float32 unit vectors (the one embedding forward)."""
        return embed_images(self.model, images, self.device).numpy()

    def score_embeddings(self, z: np.ndarray) -> list[ScoreResult]:
        scores, dists, rows = self.index.score(z)
        thr = self.threshold
        out = []
        for s, d, r in zip(scores, dists, rows):
            nb = [{"id": str(self.index.ids[j]), "distance": float(dd)} for dd, j in zip(d, r) if j >= 0]
            out.append(ScoreResult(float(s), None if thr is None else bool(s > thr), thr, nb))
        return out

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.image_size, self.max_pixels, formats=self.formats, resize_mode=self.resize_mode)

    def score_bytes(self, items: list[bytes]) -> list[ScoreResult]:
        """Encoded images -> one result each; undecodable ones get an error, never an exception."""
        arrays, ok, results = [], [], [None] * len(items)
        for i, data in enumerate(items):
            try:
                arrays.append(self.decode(data))
                ok.append(i)
            except BadImage as e:
                results[i] = ScoreResult(None, None, self.threshold, [], str(e))
        if arrays:
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            for i, r in zip(ok, self.score_embeddings(self.embed(x))):
                results[i] = r
        return results
