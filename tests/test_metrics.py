import numpy as np
import pytest
from sklearn import metrics as skm

from msc_dist.metrics import at_threshold, average_precision, fpr_at_tpr, roc_curve, summary
from msc_dist.scoring import roc_auc


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_metrics_equal_scikit_learn(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    assert roc_auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(s, y)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, f2) and np.allclose(tpr, t2) and np.allclose(thr[1:], th2[1:])
    expected = min(f for f, t in zip(f2, t2) if t >= 0.95)
    assert fpr_at_tpr(s, y) == pytest.approx(expected)
    thr0 = float(np.median(s))
    pred = s > thr0
    r = at_threshold(s, y, thr0)
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert r["fpr"] == pytest.approx(fp / (fp + tn))
    assert set(summary(s, y, thr0)) == {"roc_auc", "average_precision", "fpr_at_95_tpr", "f1_at_threshold",
                                         "fpr_at_threshold", "threshold", "f1_max", "f1_max_threshold"}


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_pr_curve_and_f1_optimal_threshold(seed, ties):
    from msc_dist.metrics import best_f1, pr_curve

    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    precision, recall, thr = pr_curve(s, y)
    p2, r2, t2 = skm.precision_recall_curve(y, s, drop_intermediate=False)
    # scikit-learn: ascending thresholds, plus a final (1, 0) point
    assert np.allclose(precision, p2[:-1][::-1]) and np.allclose(recall, r2[:-1][::-1]) and np.allclose(thr, t2[::-1])
    f1, cut = best_f1(s, y)
    brute = max(skm.f1_score(y, s >= t) for t in np.unique(s))
    assert f1 == pytest.approx(brute)
    assert at_threshold(s, y, cut)["f1"] == pytest.approx(f1)  # the threshold reported gives that F1
    r = summary(s, y, float(np.median(s)))
    assert r["f1_max"] >= r["f1_at_threshold"] and r["f1_max_threshold"] == cut


def test_training_and_served_scores_are_one_path(tmp_path):
    """Training's per-epoch ROC-AUC (scoring.knn_score, torch) and served scores (the FAISS index
    the Scorer loads) give the same scores and distances: one formula, scoring.knn_from_similarities."""
    import torch

    from msc_dist.index import load_index, write_index
    from msc_dist.scoring import knn_from_similarities, knn_score

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    q[0] = bank[3]  # an exact match: distance 0 (clamped, never negative)
    write_index(str(tmp_path), bank.numpy(), [f"id{i}" for i in range(500)], "m", num_shards=3, k=2)
    served, dists, _ = load_index(str(tmp_path)).score(q.numpy())
    trained = knn_score(q, bank, k=2).numpy()
    assert np.allclose(served, trained, atol=1e-5) and trained[0] == pytest.approx(served[0], abs=1e-6)
    s, d = knn_from_similarities((q @ bank.T).topk(2, dim=1).values.numpy())
    assert np.allclose(s, served, atol=1e-5) and np.allclose(d, dists, atol=1e-5) and (d >= 0).all()


# ---- pixel metrics (maps against masks) -----------------------------------------------------

def _pro_brute(maps, masks, max_fpr):
    """PRO written plainly: for every distinct threshold, flag pixels >= it, the mean overlap of
    every 8-connected region and the FPR over normal pixels; trapezoids up to max_fpr."""
    from scipy.ndimage import label

    regions = []
    for i, m in enumerate(masks):
        lab, n = label(m, structure=np.ones((3, 3), int))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = sum(int((~m.astype(bool)).sum()) for m in masks)
    pts = [(0.0, 0.0)]
    for t in sorted({float(v) for a in maps for v in np.ravel(a)}, reverse=True):
        flag = [a >= t for a in maps]
        fp = sum(int((f & ~m.astype(bool)).sum()) for f, m in zip(flag, masks))
        ov = np.mean([(flag[i] & r).sum() / r.sum() for i, r in regions])
        pts.append((fp / normal, ov))
    pts.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the crossing segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / max_fpr


def test_pixel_metrics_by_hand():
    from msc_dist.metrics import pixel_roc_auc, pro, pro_curve

    a = np.array([[3.0, 2.0, 1.0, 0.0]])
    m = np.array([[1, 0, 1, 0]], bool)  # two one-pixel regions (not 8-adjacent), two normal pixels
    # positives {3, 1} against negatives {2, 0}: 3 of the 4 pairs ordered right
    assert pixel_roc_auc([a], [m]) == 0.75
    fpr, ov = pro_curve([a], [m])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1, 1] and ov.tolist() == [0, 0.5, 0.5, 1, 1, 1]
    assert pro([a], [m]) == pytest.approx(0.5)  # PRO 0.5 all the way to FPR 0.3
    assert pro([a], [m], max_fpr=1.0) == pytest.approx(0.75)  # 0.5 * 0.5 + 0.5 * 1
    # a perfect map finds every region before any normal pixel
    assert pro([m.astype(float)], [m]) == 1.0 and pixel_roc_auc([m.astype(float)], [m]) == 1.0


def test_pro_averages_over_regions_not_pixels():
    """A large region found whole and a small one missed: pixel recall near 1, PRO one half."""
    from msc_dist.metrics import pixel_roc_auc, pro

    m = np.zeros((20, 20), bool)
    m[0:10, 0:10] = True  # 100 pixels
    m[18, 18] = True  # 1 pixel, apart
    a = np.where(m, 1.0, 0.5)
    a[18, 18] = 0.0  # below every normal pixel
    assert pro([a], [m]) == pytest.approx(0.5)
    assert pixel_roc_auc([a], [m]) == pytest.approx(100 / 101)
    # a pixel touching a pair at a corner joins it (8-connectivity): one region of 3, a third of it
    # found (4-connectivity would make two regions, one found whole: 0.5)
    m2 = np.zeros((4, 4), bool)
    m2[0, 0] = m2[0, 1] = m2[1, 2] = True
    a2 = np.full((4, 4), 0.5)  # the normal pixels, all flagged at once
    a2[m2] = 0.0
    a2[1, 2] = 1.0
    assert pro([a2], [m2]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_equal_brute_force_on_random_maps(seed):
    from scipy.ndimage import binary_dilation

    from msc_dist.metrics import pixel_roc_auc, pro

    rng = np.random.default_rng(seed)
    masks = [binary_dilation(rng.random((12, 12)) < 0.04, iterations=int(rng.integers(0, 2))) for _ in range(5)]
    masks[0][:] = False  # a normal image: only normal pixels
    # quantised maps (many ties), higher on the defects
    maps = [np.round(rng.normal(size=(12, 12)) + 1.5 * mk, 1) for mk in masks]
    auc = skm.roc_auc_score(np.concatenate([mk.ravel() for mk in masks]), np.concatenate([a.ravel() for a in maps]))
    assert pixel_roc_auc(maps, masks) == pytest.approx(auc, abs=1e-12)
    for max_fpr in (0.05, 0.3, 1.0):
        assert pro(maps, masks, max_fpr) == pytest.approx(_pro_brute(maps, masks, max_fpr), abs=1e-9)


def test_pixel_metrics_refuse_mismatched_shapes_and_say_nan_without_regions():
    from msc_dist.metrics import pixel_roc_auc, pro

    with pytest.raises(ValueError, match="same"):
        pixel_roc_auc([np.zeros((4, 4))], [np.zeros((4, 5), bool)])
    with pytest.raises(ValueError, match="max_fpr"):
        pro([np.zeros((4, 4))], [np.zeros((4, 4), bool)], max_fpr=0)
    assert np.isnan(pro([np.zeros((4, 4))], [np.zeros((4, 4), bool)]))
    assert np.isnan(pixel_roc_auc([np.zeros((4, 4))], [np.zeros((4, 4), bool)]))
