"""Patch features, the normal patch bank and anomaly maps (issue 27). Pure torch/numpy: no ray,
no torch.distributed.

    spec = PatchSpec.default(backbone)                    # stages, pool, budget, seed, sigma, source
    ext = PatchExtractor(feature_model, spec)             # forward hooks on the chosen trunk stages
    z, p = ext(x_unit)                                    # ONE forward: (B, D) unit vectors, (B, h, w, C)
    keep = select_patches(p[i].reshape(-1, C), spec.budget, spec.seed, sample_id)   # the bank rows of image i
    d = nearest(bank_index, p.reshape(B, -1, C))          # (B, h*w) distance to the nearest bank patch
    m = anomaly_map(d.reshape(B, h, w), S, spec.sigma)    # (B, S, S) float32, larger = more anomalous

Patch features: the outputs of trunk stages ``stages`` (timm's EfficientNet-Lite ``blocks.N``, the
ResNets' ``layerN``, tiny_cnn's module N), each averaged over a ``pool`` x ``pool`` neighbourhood
(stride 1), the coarser ones bilinearly upsampled to the finest stage's grid, with ``norm``
"unit" each stage's vector scaled to length 1, concatenated along channels. Distances are
Euclidean (not squared) in that feature space.

The bank keeps ``budget`` patches per normal image, chosen within the image alone by a greedy
coreset (farthest-point selection, started at a patch drawn from ``seed`` and the image's id), so
a bank built in shards by many workers holds exactly the rows one bank built in one process holds.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

SOURCES = ("frozen", "msc")
SCORE_MODES = ("global", "patch", "combined")
SELECTIONS = ("coreset", "random")
NORMS = ("none", "unit")  # per stage: raw features, or each stage's patch vector scaled to unit length
DEFAULT_BUDGET = 32
DEFAULT_SIGMA = 4.0


class PatchError(ValueError):
    pass


@dataclass(frozen=True)
class PatchSpec:
    stages: tuple[int, ...]
    pool: int = 3
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    sigma: float = DEFAULT_SIGMA
    source: str = "frozen"  # frozen: the ImageNet trunk; msc: the fine-tuned checkpoint's trunk
    norm: str = "none"  # a bank recorded without one (before 2026-12-02) is "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        if not self.stages:
            raise PatchError("PatchSpec.stages: at least one trunk stage")
        if int(self.pool) < 1 or int(self.pool) % 2 == 0:
            raise PatchError(f"PatchSpec.pool must be an odd number >= 1, got {self.pool}")
        if int(self.budget) < 1:
            raise PatchError(f"PatchSpec.budget must be >= 1 patches per image, got {self.budget}")
        if float(self.sigma) < 0:
            raise PatchError(f"PatchSpec.sigma must be >= 0 px, got {self.sigma}")
        if self.norm not in NORMS:
            raise PatchError(f"PatchSpec.norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.source not in SOURCES:
            raise PatchError(f"PatchSpec.source must be one of {list(SOURCES)}, got {self.source!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def default(cls, backbone: str, **overrides) -> "PatchSpec":
        from msc_dist.backbones import get_spec

        spec = get_spec(backbone)
        if not spec.patch_stages:
            raise PatchError(f"backbone {backbone} has no patch stages")
        over = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{"stages": spec.patch_stages, "norm": spec.patch_norm, **over})


def stage_names(backbone: str, stages: tuple[int, ...]) -> list[str]:
    """Trunk module names of ``stages`` for ``backbone`` (its ``BackboneSpec.patch_layer``)."""
    from msc_dist.backbones import get_spec

    spec = get_spec(backbone)
    if not spec.patch_layer:
        raise PatchError(f"backbone {backbone} has no patch stages")
    return [spec.patch_layer.format(s) for s in stages]


class PatchExtractor:
    """Forward hooks on a FeatureModel's trunk stages: ``self(x)`` runs the model once and returns
    its pooled unit vectors and the patch features of that same forward. Thread-safe (serving
    embeds in threads): each calling thread collects its own stage outputs."""

    def __init__(self, model, spec: PatchSpec):
        self.model, self.spec = model, spec
        self.names = stage_names(model.spec.name, spec.stages)
        self._local = threading.local()
        modules = dict(model.trunk.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise PatchError(f"{model.spec.name} has no trunk stage(s) {missing}; stages {list(spec.stages)} asked")
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, _inp, out):
            got = getattr(self._local, "feats", None)
            if got is not None:
                got[name] = out

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, S, S) float [0, 1] on the model's device -> ((B, D), (B, h, w, C)) float32."""
        self._local.feats = {}
        try:
            z = self.model(x)
            maps = [self._local.feats[n] for n in self.names]
        finally:
            self._local.feats = None
        return z.float(), aggregate(maps, self.spec.pool, self.spec.norm)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def aggregate(maps: list[torch.Tensor], pool: int, norm: str = "none") -> torch.Tensor:
    """Stage outputs (B, C_i, h_i, w_i) -> (B, h, w, sum C_i) float32 at the finest grid:
    ``pool`` x ``pool`` average (stride 1, the border averaged over what is inside), coarser grids
    upsampled bilinearly, ``norm`` "unit": each stage's patch vector scaled to length 1 (so every
    stage weighs the same in the distance, whatever its channels' scale), channels concatenated."""
    h = max(m.shape[-2] for m in maps)
    w = max(m.shape[-1] for m in maps)
    out = []
    for m in maps:
        m = m.float()
        if pool > 1:
            m = F.avg_pool2d(m, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        if norm == "unit":
            m = F.normalize(m, dim=1, eps=1e-6)
        out.append(m)
    return torch.cat(out, dim=1).permute(0, 2, 3, 1).contiguous()


def _image_rng(seed: int, sample_id: str | None) -> np.random.Generator:
    tag = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng(tag)


def select_patches(p: np.ndarray, budget: int, seed: int = 0, sample_id: str | None = None,
                   method: str = "coreset") -> np.ndarray:
    """Row numbers (sorted) of the ``budget`` patches of one image's (n, C) patches that go into
    the bank: all when n <= budget. ``coreset``: greedy farthest-point selection started at a
    patch drawn from (seed, sample id); ``random``: a seeded random subset (the baseline). A
    function of the image's patches, the seed and its id only."""
    p = np.asarray(p, np.float32)
    n = p.shape[0]
    if n <= budget:
        return np.arange(n)
    rng = _image_rng(seed, sample_id)
    if method == "random":
        return np.sort(rng.choice(n, size=budget, replace=False))
    if method != "coreset":
        raise PatchError(f"unknown patch selection {method!r}; valid: {list(SELECTIONS)}")
    p64 = p.astype(np.float64)
    sq = (p64 * p64).sum(1)
    chosen = [int(rng.integers(n))]
    dist = np.maximum(sq + sq[chosen[0]] - 2 * p64 @ p64[chosen[0]], 0)
    for _ in range(budget - 1):
        j = int(np.argmax(dist))
        chosen.append(j)
        dist = np.minimum(dist, np.maximum(sq + sq[j] - 2 * p64 @ p64[j], 0))
    return np.sort(np.array(chosen))


def bank_rows(patches: np.ndarray, spec: PatchSpec, ids, method: str = "coreset") -> np.ndarray:
    """(B, h, w, C) patches of B normal images -> (B, min(budget, h*w), C) float32: each image's bank rows."""
    b, h, w, c = patches.shape
    flat = np.asarray(patches, np.float32).reshape(b, h * w, c)
    return np.stack([flat[i, select_patches(flat[i], spec.budget, spec.seed, str(ids[i]), method)]
                     for i in range(b)]) if b else np.zeros((0, min(spec.budget, h * w), c), np.float32)


def new_bank_index(dim: int):
    import faiss

    return faiss.IndexFlatL2(dim)


def nearest(index, patches: np.ndarray, chunk: int = 65536, candidates: int = 4) -> np.ndarray:
    """(B, n, C) query patches -> (B, n) squared L2 distances to the nearest patch in ``index``
    (inf where the index is empty). Shards merge exactly by ``np.minimum``.

    FAISS finds ``candidates`` nearest patches; their distances are then recomputed exactly, one
    (query, patch) pair at a time, and the smallest kept. FAISS's own distances go through BLAS,
    whose rounding depends on the shape of the query block (about 1e-5 here): without the
    recomputation a map would depend on the batch its image was scored in, and serving's map would
    differ from ``msc predict``'s by a grey level."""
    b, n, c = patches.shape
    q = np.ascontiguousarray(patches.reshape(-1, c), np.float32)
    out = np.full(len(q), np.inf, np.float32)
    if index.ntotal:
        k = int(min(candidates, index.ntotal))
        for s in range(0, len(q), chunk):
            qs = q[s:s + chunk]
            _, ids = index.search(qs, k)
            found = ids >= 0
            vecs = index.reconstruct_batch(np.where(found, ids, 0).ravel()).reshape(len(qs), k, c)
            d = np.square(vecs - qs[:, None, :]).sum(axis=2, dtype=np.float32)
            out[s:s + chunk] = np.where(found, d, np.inf).min(axis=1)
    return out.reshape(b, n)


def anomaly_map(sq_dist: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """(B, h, w) squared nearest-bank distances -> (B, S, S) float32 maps at the image's size:
    Euclidean distance per patch, bilinear to S x S, Gaussian of ``sigma`` px (reflecting border)."""
    from scipy.ndimage import gaussian_filter

    d = torch.from_numpy(np.sqrt(np.maximum(np.asarray(sq_dist, np.float32), 0)))[:, None]
    up = F.interpolate(d, size=(int(size), int(size)), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = np.stack([gaussian_filter(m, sigma=float(sigma), mode="reflect", truncate=4.0) for m in up]) if len(up) else up
    return np.ascontiguousarray(up, dtype=np.float32)


def patch_scores(maps: np.ndarray) -> np.ndarray:
    """(B, S, S) maps -> (B,) image scores: each map's maximum."""
    return maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)


def combined_scores(global_scores: np.ndarray, patch: np.ndarray, global_threshold: float,
                    patch_threshold: float) -> np.ndarray:
    """``combined``: each score divided by its own calibrated threshold, summed, so neither scale
    dominates (1 + 1 = 2 for an image at both thresholds)."""
    return np.asarray(global_scores, np.float64) / global_threshold + np.asarray(patch, np.float64) / patch_threshold
