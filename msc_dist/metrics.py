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


# Pixel metrics of anomaly maps against masks (evaluation with masks, ``msc test`` and ``bench
# quality``): every map and its mask are the same shape (the card's S x S input), True = defect.

def _pixel_arrays(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = list(maps), list(masks)
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    for i, (a, m) in enumerate(zip(maps, masks)):
        if np.shape(a) != np.shape(m) or np.ndim(a) != 2:
            raise ValueError(f"map {i} is {np.shape(a)} but its mask is {np.shape(m)}; both must be the same (H, W)")
    if not maps:
        return np.zeros((0, 0, 0), np.float64), np.zeros((0, 0, 0), bool)
    a = np.asarray(maps)  # float32 maps stay float32 (the contract's): half the memory of a copy
    return (a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)), np.asarray(masks).astype(bool)


def pixel_roc_auc(maps, masks) -> float:
    """ROC-AUC over every pixel of every image: the map's value scores the pixel, the mask labels it
    (ties by average rank, as ``roc_auc``). nan when no pixel is a defect or none is normal."""
    a, m = _pixel_arrays(maps, masks)
    return roc_auc(a.ravel(), m.ravel())


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro): the per-region-overlap curve, a point per distinct map value (descending
    thresholds, a pixel is flagged when its value is >= the threshold), from (0, 0) to (1, 1).
    Regions are the 8-connected components of each mask; PRO at a threshold is the flagged
    fraction of each region's pixels, averaged over every region of every image; FPR is the
    flagged fraction of all normal pixels (MVTec AD's definition)."""
    from scipy.ndimage import label

    a, m = _pixel_arrays(maps, masks)
    normal = ~m  # each normal pixel adds 1 / (normal pixels) to the FPR when flagged
    overlap = np.zeros(a.shape, np.float64)  # each defect pixel adds 1 / (its region's size)
    n_regions = 0
    for i in range(len(m)):
        lab, n = label(m[i], structure=np.ones((3, 3), int))
        if n:
            sizes = np.bincount(lab.ravel())
            inside = lab > 0
            overlap[i][inside] = 1.0 / sizes[lab[inside]]
            n_regions += n
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    order = np.argsort(-a.ravel(), kind="mergesort")
    s = a.ravel()[order]
    fpr = np.cumsum(normal.ravel()[order]) / n_normal
    pro = np.cumsum(overlap.ravel()[order]) / n_regions
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last pixel of each run of equal values
    fpr, pro = np.clip(fpr[last], 0, 1), np.clip(pro[last], 0, 1)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def pro(maps, masks, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve (``pro_curve``) from FPR 0 to ``max_fpr``, divided
    by ``max_fpr`` (1.0 = every region wholly found before any normal pixel is flagged), the curve
    interpolated linearly at ``max_fpr`` (MVTec AD's and anomalib's PRO). nan without a defect
    region or a normal pixel."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, ov = pro_curve(maps, masks)
    if np.isnan(ov).any():
        return float("nan")
    keep = fpr <= max_fpr
    x, y = fpr[keep], ov[keep]
    if x[-1] < max_fpr:  # the segment that crosses max_fpr, cut there
        j = int(np.argmax(fpr > max_fpr))
        y_at = ov[j - 1] + (ov[j] - ov[j - 1]) * (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_at]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / max_fpr)
