"""PNG plots for an evaluation run (matplotlib, Agg backend)."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from msc_dist.metrics import best_f1, pr_curve, roc_curve  # noqa: E402

FIGSIZE = (6.4, 4.8)
DPI = 100  # 640 x 480 pixels


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def roc_plot(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """curves: method -> (scores, is_anomaly, auc)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for m, (s, y, auc) in curves.items():
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr, tpr, label=f"{m} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    _save(fig, path)


def pr_plot(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """curves: method -> (scores, is_anomaly, average precision). Each curve marks its F1-optimal
    point; the dotted line is the anomaly rate (a random scorer's precision)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    rate = None
    for m, (s, y, ap) in curves.items():
        precision, recall, _ = pr_curve(s, y)
        (line,) = ax.step(np.r_[0, recall], np.r_[precision[0] if len(precision) else 1, precision], where="post",
                          label=f"{m} (AP {ap:.3f})")
        f1, cut = best_f1(s, y)
        pred = np.asarray(s) > cut
        yy = np.asarray(y, bool)
        if pred.any():
            ax.plot([(pred & yy).sum() / max(1, yy.sum())], [(pred & yy).sum() / pred.sum()], "o",
                    color=line.get_color(), label=f"{m} best F1 {f1:.3f}")
        rate = float(yy.mean())
    if rate is not None:
        ax.axhline(rate, color="k", ls=":", lw=0.8)
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    _save(fig, path)


def histogram(path: str, scores: np.ndarray, y: np.ndarray, threshold: float | None, title: str) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    bins = np.linspace(scores.min(), scores.max(), 40)
    ax.hist(scores[~y], bins=bins, alpha=0.6, density=True, label=f"normal (n={int((~y).sum())})")
    ax.hist(scores[y], bins=bins, alpha=0.6, density=True, label=f"anomalous (n={int(y.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="anomaly score (sum of squared distances to 2 nearest normals)", ylabel="density", title=title)
    ax.legend()
    _save(fig, path)


def auc_per_epoch(path: str, series: dict[str, list[tuple[int, float]]], title: str) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for m, pts in series.items():
        if pts:
            e, a = zip(*sorted(pts))
            ax.plot(e, a, marker="o", label=m)
    ax.set(xlabel="epoch (0 = frozen features)", ylabel="ROC-AUC (kNN, k=2)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if any(series.values()):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no fine-tuning run in this evaluation", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


GALLERY_CELL = (2.4, 2.5)  # inches per image panel (width, height incl. its caption)


def gallery(path: str, highest: list[tuple[str, float, bool, bytes, bytes | None]],
            lowest: list[tuple[str, float, bool, bytes, bytes | None]], title: str) -> None:
    """Each list: (caption, score, is_anomaly, image bytes, mask bytes or None), in score order.
    One row of the highest-scored images, one of the lowest; where the data set has masks, each
    image's mask sits right under it. Size: (2.4 * k) x (2.5 * rows + 0.5) inches at 100 dpi."""
    groups = [("highest", highest), ("lowest", lowest)]
    masks = any(r[4] is not None for r in highest + lowest)
    per = 2 if masks else 1  # panel rows per group: the images, then their masks
    ncols = max(1, len(highest), len(lowest))
    w, h = GALLERY_CELL
    fig, axes = plt.subplots(2 * per, ncols, figsize=(w * ncols, h * 2 * per + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for g, (name, items) in enumerate(groups):
        for j, (cap, score, anom, img, mask) in enumerate(items):
            ax = axes[g * per][j]
            ax.imshow(Image.open(io.BytesIO(img)).convert("RGB"))
            ax.set_title(f"{name} #{j + 1}: {cap}\nscore {score:.3f} {'ANOMALY' if anom else 'normal'}", fontsize=7)
            if masks:
                m = axes[g * per + 1][j]
                if mask is not None:
                    m.imshow(Image.open(io.BytesIO(mask)).convert("L"), cmap="gray", vmin=0, vmax=255)
                    m.set_title("defect mask", fontsize=7)
                else:
                    m.text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=7, transform=m.transAxes)
    fig.suptitle(title, fontsize=10)
    # leave the top 0.5 inch to the title: tight_layout alone lets it overlap the first captions
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def epoch_auc_plot(path: str, curves: dict[str, tuple[list[list], list]], title: str) -> None:
    """curves: method -> (one [(epoch, roc_auc)] per seed, drawn faint; their mean, drawn bold).
    Epoch 0 is the frozen model, the same for every method: a dotted line marks it, so that each
    curve reads as a gain or loss over the frozen features under the same evaluation."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    curves = {m: ([[p for p in c if p[1] is not None] for c in per_seed], [p for p in mean if p[1] is not None])
              for m, (per_seed, mean) in curves.items()}  # epochs that were not evaluated are left out
    for m, (per_seed, mean) in curves.items():
        (line,) = ax.plot([e for e, _ in mean], [a for _, a in mean], "o-", label=m, lw=2)
        for c in per_seed if len(per_seed) > 1 else []:
            ax.plot([e for e, _ in c], [a for _, a in c], "-", color=line.get_color(), alpha=0.3, lw=1)
    frozen = [a for _, mean in curves.values() for e, a in mean if e == 0]
    if frozen:
        ax.axhline(frozen[0], color="k", ls=":", lw=0.8, label=f"frozen features (epoch 0) {frozen[0]:.4f}")
    ax.set(xlabel="epoch", ylabel="ROC-AUC", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="best")
    _save(fig, path)


def training_curves_plot(path: str, panels: dict[str, dict[str, list[tuple[int, float]]]], title: str) -> None:
    """One training run's per-epoch curves: panel title -> metric -> [(epoch, value)] (a panel
    with no points is left out; with none at all, one empty panel says so)."""
    panels = {t: {k: pts for k, pts in ms.items() if pts} for t, ms in panels.items()}
    panels = {t: ms for t, ms in panels.items() if ms} or {"no per-epoch metrics logged": {}}
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.5, 3.2), squeeze=False)
    for ax, (name, ms) in zip(axes[0], panels.items()):
        for k, pts in ms.items():
            ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, label=k)
        ax.set(xlabel="epoch", title=name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if len(ms) > 1:
            ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
