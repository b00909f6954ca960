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
