"""kNN anomaly scores and metrics: pure functions of tensors/arrays.

The one scoring path: the paper's score is ``knn_from_similarities`` of the k largest inner
products between a unit query and the unit normal features, whoever finds them (``knn_score``
with a torch matmul + top-k for training's per-epoch ROC-AUC, FAISS in ``index.ShardedIndex``
for served and offline scores)."""

from __future__ import annotations

import numpy as np
import torch


def squared_distances(sims):
    """Inner products of unit vectors -> squared L2 distances, 2 - 2 cos, clamped at 0 (rounding
    can make cos exceed 1). numpy arrays or torch tensors, any shape; float32 out."""
    if isinstance(sims, torch.Tensor):
        return (2.0 - 2.0 * sims.float()).clamp_min_(0)
    return np.maximum(2.0 - 2.0 * np.asarray(sims, np.float32), 0.0).astype(np.float32)


def knn_from_similarities(sims):
    """(Q, k) inner products with the k nearest normal features -> ((Q,) scores, (Q, k) squared
    distances): the score is the sum of the k squared distances."""
    d = squared_distances(sims)
    return d.sum(1) if isinstance(d, torch.Tensor) else d.sum(axis=1), d


def knn_score(queries: torch.Tensor, bank: torch.Tensor, k: int = 2, chunk: int = 4096) -> torch.Tensor:
    """The paper's score: sum of squared L2 distances to the k nearest bank features.

    queries: (Q, D), bank: (N, D), both L2-normalised, so ||q - b||^2 = 2 - 2 q.b and the k
    nearest are the k largest inner products. Returns (Q,) float32. Chunked over queries to
    bound memory at chunk x N."""
    if bank.shape[0] < k:
        raise ValueError(f"need at least k={k} normal features, have {bank.shape[0]}")
    out = []
    for q in queries.split(chunk):
        sims = q.float() @ bank.float().T  # (q, N)
        top = sims.topk(k, dim=1).values  # (q, k)
        out.append(knn_from_similarities(top)[0])
    return torch.cat(out) if out else torch.zeros(0)


def roc_auc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """ROC-AUC with ties handled by average ranks (equals sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
