"""The README's anomaly-map picture: defective magnetic tiles, their maps (frozen EfficientNet-Lite0
patch bank, the product's defaults) and their masks.

    python infra/results/quality/maps/figure.py --out infra/results/quality/maps/tiles_maps.png

One process, the product's code: the split of ``msc data make-shards DATA OUT --exts jpg
--normal-class MT_Free --train-fraction 0.7 --seed 0`` (masks packed beside the images), a
0-epoch checkpoint of the frozen backbone and its model card (squash: the whole tile, --size px), the bank
of the normal training images (``patches.bank_rows``, the default budget; the embedding job's
hashed-id hold-out of 10 % calibrates the map threshold at 1 % FPR, as the job does), the maps of
``ModelCard.embed_with_patches`` + ``nearest`` + ``anomaly_map``, drawn by ``maps.heatmap`` and
``maps.overlay`` (the same overlay as ``msc predict --maps``: the middle of the colour scale is
the threshold, cyan boxes the regions over it). The tiles shown are not chosen by their maps: the first --per-class test
tiles of each defect class in key order.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/magnetic-tile")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--out", default="infra/results/quality/maps/tiles_maps.png")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msc_dist import checkpoint as ckpt
    from msc_dist.backbones import build_model
    from msc_dist.card import load_card
    from msc_dist.data.make_shards import make_shards
    from msc_dist.data.masks import sample_mask
    from msc_dist.data.shards import iter_samples
    from msc_dist.embed.workers import held_out
    from msc_dist.index import threshold_at_fpr
    from msc_dist.maps import heatmap, overlay
    from msc_dist.patches import PatchSpec, anomaly_map, bank_rows, nearest, new_bank_index, patch_scores

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="tiles_maps_")
    try:
        info = make_shards(a.data, os.path.join(tmp, "shards"), ["jpg"], 1000, "MT_Free", 0.7, 0)
        classes = info["test"].classes
        normal = classes.index("MT_Free")
        model = build_model(a.backbone)
        ck = os.path.join(tmp, "ck")
        ckpt.save(ck, model.state_dict(), torch.nn.functional.normalize(torch.ones(model.dim), dim=0),
                  {"backbone": a.backbone, "image_size": a.size, "resize_mode": "squash",
                   "normal_classes": ["MT_Free"]}, {"epoch": 0})
        card = load_card(ck)
        spec = PatchSpec.default(a.backbone, source="msc")  # a 0-epoch checkpoint: its trunk is the frozen one

        def patches(samples):
            out = []
            for s in range(0, len(samples), 32):
                x = np.stack([card.preprocess(t.data) for t in samples[s:s + 32]])
                out.append(card.embed_arrays_with_patches(x, spec)[1])
            return np.concatenate(out)

        train = [s for sh in info["train"].shards for s in iter_samples(sh.url)]
        p = patches(train)
        n, h, w, c = p.shape
        cal = held_out([s.key for s in train], 0.1, 0)
        index = new_bank_index(c)
        index.add(np.ascontiguousarray(bank_rows(p[~cal], spec, [s.key for s, k in zip(train, cal) if not k])
                                       .reshape(-1, c)))

        def maps_of(pp):
            return anomaly_map(nearest(index, pp.reshape(len(pp), h * w, c)).reshape(-1, h, w), a.size, spec.sigma)

        threshold = threshold_at_fpr(patch_scores(maps_of(p[cal])), 0.01)
        test = sorted((s for sh in info["test"].shards for s in iter_samples(sh.url, masks=True)
                       if s.label != normal), key=lambda s: s.key)
        shown = []
        for ci, name in enumerate(classes):
            if ci != normal:
                shown += [s for s in test if s.label == ci][:a.per_class]
        m = maps_of(patches(shown))
        print(f"bank {index.ntotal} patches ({spec.budget}/image), map threshold {threshold:.3f}; "
              f"{len(shown)} tiles", flush=True)

        rows = ("tile", "anomaly map", "overlay", "mask")
        fig, axes = plt.subplots(4, len(shown), figsize=(1.9 * len(shown), 8.0), squeeze=False)
        for j, (s, mm) in enumerate(zip(shown, m)):
            img = card.preprocess(s.data)
            panels = (img, heatmap(mm, threshold), overlay(img, mm, threshold), sample_mask(s, card.preprocess, True))
            for i, panel in enumerate(panels):
                ax = axes[i][j]
                ax.imshow(panel, cmap="gray" if i == 3 else None, vmin=0, vmax=1 if i == 3 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(rows[i])
            axes[0][j].set_title(classes[s.label].removeprefix("MT_") + f"\nscore {mm.max() / threshold:.1f}x thr",
                                 fontsize=9)
        fig.suptitle(f"Magnetic tiles, frozen {a.backbone} patch maps at {a.size} px (threshold: 1 % FPR on "
                     "held-out normals)", fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        fig.savefig(a.out, dpi=90)
        print(f"wrote {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
