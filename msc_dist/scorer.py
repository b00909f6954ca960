"""Model card + index -> anomaly scores: the one Scorer of offline scoring, ``msc predict/test``
and both serving layouts.

A Scorer is an embedder (the ``ModelCard``: preprocessing and the batch forward) and a searcher
(``search(z) -> (scores, distances, ids)`` over one index version). ``LocalSearcher`` searches a
loaded index in this process; the sharded serving layout composes the same Scorer with a
searcher that fans out to its index-shard deployments (``serving.sharded.FanOutSearcher``).
A Scorer refuses a pair whose index was not built by its model, or whose manifest records
another image size or resize mode than the checkpoint's (``check_pair``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from msc_dist.card import ModelCard, load_card
from msc_dist.config import ConfigError
from msc_dist.data.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, BadImage, Preprocess
from msc_dist.index import IndexManifest, IndexMismatch, ShardedIndex, load_index
from msc_dist.patches import PatchSpec, anomaly_map, combined_scores, patch_scores
from msc_dist.storage import expand


@dataclass
class ScoreResult:
    score: float | None
    is_anomaly: bool | None
    threshold: float | None
    neighbors: list[dict]  # [{"id": str, "distance": float}] nearest first (squared L2)
    error: str | None = None
    version: str | None = None  # the index version that scored it
    patch_score: float | None = None  # the anomaly map's maximum (a version with a patch bank)
    map: np.ndarray | None = None  # (S, S) float32 anomaly map when asked for (not in to_dict)

    def to_dict(self) -> dict:
        return {"score": self.score, "is_anomaly": self.is_anomaly, "threshold": self.threshold,
                "neighbors": self.neighbors, "index_version": self.version,
                **({"patch_score": self.patch_score} if self.patch_score is not None else {}),
                **({"error": self.error} if self.error else {})}


class Searcher(Protocol):
    manifest: IndexManifest

    def search(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, D) -> (scores (B,), squared distances (B, k), sample ids (B, k) object, None = none)."""

    # A version with a patch bank: ``search_patches(p (B, n, C)) -> (B, n)`` squared distances to
    # the nearest bank patch (optional; ``LocalSearcher`` has it).


class LocalSearcher:
    """One loaded index version, searched in this process."""

    def __init__(self, index: ShardedIndex):
        self.index, self.manifest = index, index.manifest

    def search(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, d, rows = self.index.score(z)
        ids = self.index.ids[np.maximum(rows, 0)].astype(object)
        ids[rows < 0] = None
        return scores, d, ids

    def search_patches(self, p: np.ndarray) -> np.ndarray:
        return self.index.search_patches(p)


def check_pair(manifest: IndexManifest, model_id: str, preprocess: Preprocess) -> None:
    """The one check that an index version and a model belong together: the index was built by
    this model (model id), at this model's image size and resize mode."""
    if manifest.model_id != model_id:
        raise IndexMismatch(f"index version {manifest.version or '?'} was built with model {manifest.model_id[:12]}…, "
                            f"not this checkpoint's {model_id[:12]}…: rebuild it with python -m msc_dist.embed, or "
                            "leave the checkpoint out to use the one the index records")
    extra = manifest.extra
    recorded = {"image_size": extra.get("image_size"), "resize_mode": extra.get("resize_mode")}
    ours = {"image_size": preprocess.image_size, "resize_mode": preprocess.resize_mode}
    wrong = [k for k, v in recorded.items() if v is not None and (int(v) if k == "image_size" else str(v)) != ours[k]]
    if wrong:
        raise IndexMismatch(f"index version {manifest.version or '?'} records {', '.join(f'{k} {recorded[k]}' for k in wrong)} "
                            f"but its checkpoint preprocesses with {', '.join(f'{k} {ours[k]}' for k in wrong)}: the "
                            "manifest and the checkpoint disagree; rebuild the index with python -m msc_dist.embed")


def checkpoint_of(manifest: IndexManifest, checkpoint: str | None = None) -> str:
    """The checkpoint given, else the one the index manifest records (the one that built it)."""
    ck = checkpoint or manifest.extra.get("checkpoint")
    if not ck:
        raise IndexMismatch(f"the manifest of index version {manifest.version or '?'} names no checkpoint: pass one")
    return expand(ck)


class Scorer:
    """Embedder (model card) + searcher (one index version)."""

    def __init__(self, card: ModelCard, searcher: Searcher, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] = DEFAULT_FORMATS):
        check_pair(searcher.manifest, card.model_id, card.preprocess)
        self.card, self.searcher = card, searcher
        self.max_pixels, self.formats = max_pixels, tuple(formats)
        patch = searcher.manifest.patch
        self.patch_spec = PatchSpec.from_dict(patch) if patch else None  # None: no bank, global scores only
        self.score_mode = patch["score_mode"] if patch else "global"

    # What callers read of the pair.
    manifest = property(lambda self: self.searcher.manifest)
    index = property(lambda self: self.searcher.index)  # LocalSearcher only
    preprocess = property(lambda self: self.card.preprocess)
    model_id = property(lambda self: self.card.model_id)
    config = property(lambda self: self.card.config)
    checkpoint = property(lambda self: self.card.checkpoint)
    image_size = property(lambda self: self.card.preprocess.image_size)
    resize_mode = property(lambda self: self.card.preprocess.resize_mode)
    threshold = property(lambda self: self.searcher.manifest.threshold)
    version = property(lambda self: self.searcher.manifest.version)

    def info(self) -> dict[str, Any]:
        """For API clients: the card and the index version (no storage URIs)."""
        m = self.manifest
        return {**self.card.info(), "version": m.version, "index_version": m.version, "index_size": m.count,
                "dimension": m.dimension, "k": m.k, "threshold": m.threshold, "target_fpr": m.target_fpr,
                "index_shards": len(m.shards),
                **({"score_mode": self.score_mode, "map_threshold": self.map_threshold} if m.patch else {})}

    def embed(self, images) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, D) float32 unit vectors (the card's batch forward)."""
        return self.card.embed(images)

    def results(self, scores: np.ndarray, dists: np.ndarray, ids: np.ndarray) -> list[ScoreResult]:
        thr, version = self.threshold, self.version
        return [ScoreResult(float(s), None if thr is None else bool(s > thr), thr,
                            [{"id": str(i), "distance": float(dd)} for dd, i in zip(d, row) if i is not None], None, version)
                for s, d, row in zip(scores, dists, ids)]

    def score_embeddings(self, z: np.ndarray) -> list[ScoreResult]:
        return self.results(*self.searcher.search(z))

    async def ascore_embeddings(self, z: np.ndarray) -> list[ScoreResult]:
        """The same, off the event loop: a searcher's own ``asearch`` (a fan-out), else ``search`` in a thread."""
        asearch = getattr(self.searcher, "asearch", None)
        found = await asearch(z) if asearch is not None else await asyncio.to_thread(self.searcher.search, z)
        return self.results(*found)

    map_threshold = property(lambda self: (self.manifest.patch or {}).get("map_threshold"))

    def score_arrays(self, arrays: np.ndarray | list[np.ndarray], maps: bool = False) -> list[ScoreResult]:
        """(B, S, S, 3) uint8 made by this card's ``preprocess`` -> one result each. A version
        with a patch bank: ``maps`` fills each result's ``map`` (and ``patch_score``); score mode
        patch or combined always computes them. Without a bank: the global kNN score only."""
        if self.patch_spec is None or (self.score_mode == "global" and not maps):
            return self.score_embeddings(self.card.embed_arrays(arrays))
        z, p = self.card.embed_arrays_with_patches(arrays, self.patch_spec)
        m = self.maps_of(p)
        return self.patch_results(self.searcher.search(z), m, maps)

    def maps_of(self, p: np.ndarray) -> np.ndarray:
        """(B, h, w, C) patch features -> (B, S, S) float32 anomaly maps over this version's bank."""
        b, h, w, c = p.shape
        return self.maps_from(self.searcher.search_patches(p.reshape(b, h * w, c)), p.shape)

    def maps_from(self, d: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """(B, h*w) squared nearest-bank distances of patches of ``shape`` (B, h, w, C) -> (B, S, S) maps."""
        b, h, w, _ = shape
        return anomaly_map(np.asarray(d).reshape(b, h, w), self.image_size, self.patch_spec.sigma)

    async def ascore_arrays(self, arrays: np.ndarray | list[np.ndarray], maps: bool = False) -> list[ScoreResult]:
        """``score_arrays`` off the event loop (serving): the forward in a thread, the searches by
        the searcher's own ``asearch`` / ``asearch_patches`` (a fan-out), else in a thread."""
        if self.patch_spec is None or (self.score_mode == "global" and not maps):
            z = await asyncio.to_thread(self.card.embed_arrays, arrays)
            return await self.ascore_embeddings(z)
        z, p = await asyncio.to_thread(self.card.embed_arrays_with_patches, arrays, self.patch_spec)
        asearch = getattr(self.searcher, "asearch", None)
        found = await asearch(z) if asearch is not None else await asyncio.to_thread(self.searcher.search, z)
        b, h, w, c = p.shape
        q = p.reshape(b, h * w, c)
        apatches = getattr(self.searcher, "asearch_patches", None)
        d = await apatches(q) if apatches is not None else await asyncio.to_thread(self.searcher.search_patches, q)
        return self.patch_results(found, await asyncio.to_thread(self.maps_from, d, p.shape), maps)

    def patch_results(self, found, m: np.ndarray, maps: bool) -> list[ScoreResult]:
        """Global search results + maps -> results scored by this version's score mode."""
        scores, d, ids = found
        ps = patch_scores(m)
        if self.score_mode == "patch":
            scores = ps
        elif self.score_mode == "combined":
            t = self.manifest.patch["thresholds"]
            scores = combined_scores(scores, ps, t["global"], t["patch"])
        out = self.results(scores, d, ids)
        for r, s, mm in zip(out, ps, m):
            r.patch_score = float(s)
            r.map = mm if maps else None
        return out

    def decode(self, data: bytes) -> np.ndarray:
        return self.card.preprocess(data, self.max_pixels, self.formats)

    def score_bytes(self, items: list[bytes], maps: bool = False) -> list[ScoreResult]:
        """Encoded images -> one result each; undecodable ones get an error, never an exception."""
        arrays, ok, results = [], [], [None] * len(items)
        for i, data in enumerate(items):
            try:
                arrays.append(self.decode(data))
                ok.append(i)
            except BadImage as e:
                results[i] = ScoreResult(None, None, self.threshold, [], str(e), self.version)
        if arrays:
            for i, r in zip(ok, self.score_arrays(arrays, maps)):
                results[i] = r
        return results


def resolve_device(device: str) -> str:
    """auto: cuda when this process sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def open_scorer(index: str | ShardedIndex | None, checkpoint: str | None = None, device: str = "cpu", *,
                use_gpu_index: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                formats: tuple[str, ...] = DEFAULT_FORMATS, card: ModelCard | None = None, runtime: str = "torch",
                threads: int | None = None, cache: str | None = None) -> Scorer:
    """The Scorer of an index (its root: the live version; or a version folder: pinned) with the
    checkpoint its manifest records (or ``checkpoint``; or an already loaded ``card``).
    ``device`` auto: cuda when there is one; the index goes to the GPU with the model unless
    ``use_gpu_index`` says otherwise. ``runtime``/``threads``/``cache``: the card's (``load_card``)."""
    if not index:
        raise ConfigError("an index is needed (the embedding job's --out, e.g. ~/msc_runs/msc/serving)")
    device = resolve_device(device)
    gpu = device.startswith("cuda") if use_gpu_index is None else use_gpu_index
    idx = index if isinstance(index, ShardedIndex) else load_index(expand(index), None, gpu)
    if card is None:
        card = load_card(checkpoint_of(idx.manifest, checkpoint), device, runtime, cache=cache, threads=threads)
    return Scorer(card, LocalSearcher(idx), max_pixels=max_pixels, formats=formats)
