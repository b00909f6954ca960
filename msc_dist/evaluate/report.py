"""Tables and plots of scored test sets, shared by ``msc evaluate`` (the protocol) and ``msc test``
(an existing checkpoint + index)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from msc_dist.data.shards import iter_samples
from msc_dist.evaluate import plots


@dataclass
class Scored:
    """One method's test-set scores: what the tables and plots are made of."""

    scores: np.ndarray
    y: np.ndarray  # True = anomalous
    keys: list[str]
    threshold: float | None


def shard_images(info, want: set[str]) -> dict[str, bytes]:
    """Encoded bytes of the samples ``want`` (by key) from labelled shards."""
    return {smp.key: smp.data for sh in info.shards for smp in iter_samples(sh.url) if smp.key in want}


def shard_masks(info, want: set[str]) -> dict[str, bytes]:
    """The ``KEY.mask.png`` bytes of the samples ``want`` that carry one."""
    return {smp.key: smp.mask for sh in info.shards for smp in iter_samples(sh.url, masks=True)
            if smp.key in want and smp.mask is not None}


def write_plots(pdir: str, tag: str, title: str, scored: dict[str, Scored], results: dict[str, dict],
                images, sources: dict[str, str], gallery_k: int, masks=None, overlays=None) -> None:
    """ROC and precision-recall curves of every method side by side (roc-TAG.png, pr-TAG.png),
    and per method a score histogram with the threshold and a gallery of the highest and lowest
    scores. ``images(keys)`` gives the encoded images; ``masks(keys)`` their masks (else the
    mask file beside each source in ``sources``, where there is one); ``overlays(keys)`` the
    images with their anomaly maps, shown between each image and its mask."""
    os.makedirs(pdir, exist_ok=True)
    sfx = f"-{tag}" if tag else ""
    plots.roc_plot(os.path.join(pdir, f"roc{sfx}.png"),
                   {m: (c.scores, c.y, results[m]["roc_auc"]) for m, c in scored.items()}, f"ROC, {title}")
    plots.pr_plot(os.path.join(pdir, f"pr{sfx}.png"),
                  {m: (c.scores, c.y, results[m]["average_precision"]) for m, c in scored.items()},
                  f"precision-recall, {title}")
    for m, c in scored.items():
        s, y, keys, thr = c.scores, c.y, c.keys, c.threshold
        plots.histogram(os.path.join(pdir, f"hist{sfx}-{m}.png"), s, y, thr,
                        f"{m}, {title} (AUC {results[m]['roc_auc']:.3f})")
        order = np.argsort(-s)
        top, bottom = list(order[:gallery_k]), list(order[::-1][:gallery_k])  # each most extreme first
        shown = {keys[i] for i in top + bottom}
        data = images(shown)
        shard_mask = masks(shown) if masks is not None else {}
        over = overlays(shown) if overlays is not None else {}

        def panel(i: int) -> tuple:
            k = keys[i]
            mask = shard_mask.get(k)
            mask_path = os.path.splitext(sources[k])[0] + ".png" if k in sources else None
            if mask is None and mask_path and os.path.exists(mask_path):
                mask = open(mask_path, "rb").read()
            return (f"{k} ({'anomalous' if y[i] else 'normal'})", float(s[i]),
                    bool(thr is not None and s[i] > thr), data[k], mask, over.get(k))

        plots.gallery(os.path.join(pdir, f"gallery{sfx}-{m}.png"), [panel(i) for i in top],
                      [panel(i) for i in bottom], f"{m}, {title}: highest and lowest scores")


