"""kNN anomaly scores and metrics: pure functions of tensors/arrays."""

from __future__ import annotations

import numpy as np
import torch


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
        out.append((2.0 - 2.0 * top).clamp_min_(0).sum(dim=1))
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
