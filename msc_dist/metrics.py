"""Detection metrics as pure numpy functions (checked against scikit-learn in the tests)."""

from __future__ import annotations

import numpy as np

from msc_dist.scoring import roc_auc


def roc_curve(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a point per distinct score, plus (0, 0)."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0, tps] / max(1, y.sum())
    fpr = np.r_[0, fps] / max(1, (~y).sum())
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """Step-wise AP: sum over thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition)."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    precision = tps / (distinct + 1)
    recall = tps / max(1, y.sum())
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def pr_curve(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds): a point per distinct score, thresholds descending (a sample
    is anomalous when its score is >= the threshold). Recall rises from the first point to 1."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    return tps / (distinct + 1), tps / max(1, y.sum()), s[distinct]


def best_f1(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(F1, threshold) at the threshold that maximises F1 over the test set itself, with the
    threshold convention of ``at_threshold`` (anomalous when score > threshold). An optimistic
    figure: it picks the threshold with the test labels; the calibrated one does not."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    if len(scores) == 0 or not y.any():
        return 0.0, float("nan")
    precision, recall, thr = pr_curve(scores, y)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    i = int(np.argmax(f1))
    # Flag scores >= thr[i]: as a strict ">" threshold, the midpoint to the next lower score.
    lower = scores[scores < thr[i]]
    cut = float((thr[i] + lower.max()) / 2) if lower.size else float(np.nextafter(thr[i], -np.inf))
    return float(f1[i]), cut


def at_threshold(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """F1 and false-positive rate when score > threshold means anomalous."""
    pred = np.asarray(scores) > threshold
    y = np.asarray(y).astype(bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    return {"f1": f1, "fpr": fp / max(1, int((~y).sum())), "tpr": tp / max(1, int(y.sum()))}


def fpr_at_tpr(scores: np.ndarray, y: np.ndarray, tpr_target: float = 0.95) -> float:
    """The lowest false-positive rate among thresholds that reach ``tpr_target`` recall."""
    fpr, tpr, _ = roc_curve(scores, y)
    ok = tpr >= tpr_target
    return float(fpr[ok].min()) if ok.any() else 1.0


def summary(scores: np.ndarray, y: np.ndarray, threshold: float | None) -> dict:
    out = {"roc_auc": roc_auc(scores, y), "average_precision": average_precision(scores, y),
           "fpr_at_95_tpr": fpr_at_tpr(scores, y, 0.95)}
    if threshold is not None:
        t = at_threshold(scores, y, threshold)
        out.update(f1_at_threshold=t["f1"], fpr_at_threshold=t["fpr"], threshold=float(threshold))
    f1, thr = best_f1(scores, y)
    out.update(f1_max=f1, f1_max_threshold=thr)
    return out
