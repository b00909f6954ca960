"""Image and pixel ROC-AUC on the magnetic tiles: global kNN against patch maps (issue 27).

    nice -n 19 python infra/results/quality/maps/tiles_patch.py --size 128 --out infra/results/quality/maps/tiles_128.json

One process, no Ray, the product's code: the frozen ImageNet backbone as a 0-epoch checkpoint
(what ``bench quality``'s ``knn`` method embeds with), its model card's decode, ``embed_with_patches``
(one forward), the embedding job's hashed-id calibration hold-out (``held_out``, fraction 0.1,
seed 0), ``patches.bank_rows`` / ``nearest`` / ``anomaly_map`` and ``combined_scores``. The split
is ``msc data make-shards DATA OUT --exts jpg --normal-class MT_Free --train-fraction 0.7 --seed 0``. Pixel
ROC-AUC is over every pixel of every test image, the masks (``<name>.png`` beside each image,
white = defect) squashed to S x S like their images (nearest neighbour); normal test images count
with empty masks. Methods: ``global`` (kNN, k = 2, of the pooled vector), ``patch`` at each
--budgets with a greedy coreset and with a random subset per image, ``patch-all`` (every normal
patch in the bank), and ``combined`` (each score over its calibrated threshold, summed).
``--per-type`` adds, per defect type, image and pixel ROC-AUC of that type's test images against
the normal ones, its share of defect pixels, and the pooled pixel ROC-AUC without that type's
images (which type holds the pooled figure down), and for the coreset banks the pixel ROC-AUC of
the map lifted by its image's global score (map / patch threshold + global / global threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def frozen_tiles(data: str, tmp: str, backbone: str, size: int, seed: int, groups: str | None = None):
    """make-shards' split of the tiles into ``tmp`` (MT_Free normal, 70/30, seeded; by whole
    ``groups`` when given) and the frozen ImageNet backbone as a 0-epoch checkpoint's model card
    (squash to ``size``): (the split's DatasetInfo by name, split.json, the card)."""
    from msc_dist import checkpoint as ckpt
    from msc_dist.backbones import build_model
    from msc_dist.card import load_card
    from msc_dist.data.make_shards import make_shards

    info = make_shards(data, os.path.join(tmp, "shards"), ["jpg"], 1000, "MT_Free", 0.7, seed, groups=groups)
    with open(os.path.join(tmp, "shards", "split.json")) as f:
        split = json.load(f)
    model = build_model(backbone)
    ck = os.path.join(tmp, "ck")
    ckpt.save(ck, model.state_dict(), torch.nn.functional.normalize(torch.ones(model.dim), dim=0),
              {"backbone": backbone, "image_size": size, "resize_mode": "squash", "normal_classes": ["MT_Free"]},
              {"epoch": 0})
    return info, split, load_card(ck)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/magnetic-tile")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--stages", type=int, nargs="+", default=None, help="default: the backbone's patch_stages")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--norm", default=None, help="none | unit (default: the backbone's patch_norm)")
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--per-type", action="store_true",
                    help="also image and pixel ROC-AUC of each defect type against the normal test images")
    ap.add_argument("--out", default=None, help="JSON results (default: print only)")
    a = ap.parse_args(argv)

    from msc_dist.data.shards import iter_samples
    from msc_dist.embed.workers import held_out
    from msc_dist.index import threshold_at_fpr
    from msc_dist.patches import PatchSpec, anomaly_map, bank_rows, combined_scores, nearest, new_bank_index, patch_scores
    from msc_dist.scoring import knn_score, roc_auc

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tiles_patch_")
    info, split, card = frozen_tiles(a.data, tmp, a.backbone, a.size, a.seed)
    normal = info["test"].classes.index("MT_Free")
    spec = PatchSpec.default(a.backbone, stages=tuple(a.stages) if a.stages else None, norm=a.norm, pool=a.pool, sigma=a.sigma,
                             seed=a.seed, source="msc")  # a 0-epoch checkpoint: its trunk is the frozen one

    def embed(split_name):
        keys, labels, zs, ps = [], [], [], []
        for sh in info[split_name].shards:
            samples = list(iter_samples(sh.url))
            for s in range(0, len(samples), a.batch):
                chunk = samples[s:s + a.batch]
                z, p = card.embed_arrays_with_patches(np.stack([card.preprocess(x.data) for x in chunk]), spec)
                zs.append(z)
                ps.append(p)
                keys += [x.key for x in chunk]
                labels += [x.label for x in chunk]
        return keys, np.asarray(labels), np.concatenate(zs), np.concatenate(ps)

    tr_keys, _, tr_z, tr_p = embed("train")
    te_keys, te_y, te_z, te_p = embed("test")
    t_embed = time.perf_counter() - t0
    n, h, w, c = tr_p.shape
    print(f"embedded {len(tr_keys)} train + {len(te_keys)} test images at {a.size} px: patches {h}x{w}x{c} "
          f"({t_embed:.0f}s)", flush=True)

    # Masks, in the order of the test keys (make-shards' key of a path is sample_key(rel)).
    from msc_dist.data.make_shards import sample_key

    rel_of = {sample_key(r): r for r in split["test"]}
    masks = np.zeros((len(te_keys), a.size, a.size), bool)
    for i, k in enumerate(te_keys):
        mp = os.path.join(a.data, os.path.splitext(rel_of[k])[0] + ".png")
        if os.path.exists(mp):
            m = Image.open(mp).convert("L").resize((a.size, a.size), Image.NEAREST)
            masks[i] = np.asarray(m) > 127
    y = te_y != normal

    cal = held_out(tr_keys, 0.1, a.seed)
    bank_z, cal_z = torch.from_numpy(tr_z[~cal]), torch.from_numpy(tr_z[cal])
    g_test = knn_score(torch.from_numpy(te_z), bank_z, k=2).numpy()
    g_cal = knn_score(cal_z, bank_z, k=2).numpy()
    res = {"global": {"image_roc_auc": roc_auc(g_test, y)}}
    print(f"global kNN: image ROC-AUC {res['global']['image_roc_auc']:.4f}", flush=True)

    def maps_of(index, p):
        b = len(p)
        out = [anomaly_map(nearest(index, p[s:s + 64].reshape(-1, h * w, c)).reshape(-1, h, w), a.size, a.sigma)
               for s in range(0, b, 64)]
        return np.concatenate(out)

    keep_keys = [k for k, is_cal in zip(tr_keys, cal) if not is_cal]
    keep_p = tr_p[~cal]
    configs = [(f"patch-{m}-{b}", m, b) for b in a.budgets if b < h * w for m in ("coreset", "random")]
    configs.append(("patch-all", "coreset", h * w))
    for name, method, budget in configs:
        t1 = time.perf_counter()
        s = PatchSpec(spec.stages, spec.pool, budget, spec.seed, spec.sigma, spec.source, spec.norm)
        rows = bank_rows(keep_p, s, keep_keys, method)
        index = new_bank_index(c)
        index.add(np.ascontiguousarray(rows.reshape(-1, c)))
        m_test = maps_of(index, te_p)
        p_test = patch_scores(m_test)
        r = {"image_roc_auc": roc_auc(p_test, y), "pixel_roc_auc": roc_auc(m_test.reshape(-1), masks.reshape(-1)),
             "budget": int(min(budget, h * w)), "selection": method, "bank_patches": int(index.ntotal),
             "bank_bytes_per_image": int(min(budget, h * w) * c * 4), "seconds": time.perf_counter() - t1}
        if method == "coreset":
            p_cal = patch_scores(maps_of(index, tr_p[cal]))
            tg, tp = threshold_at_fpr(g_cal, 0.01), threshold_at_fpr(p_cal, 0.01)
            comb = combined_scores(g_test, p_test, tg, tp)
            r["combined_image_roc_auc"] = roc_auc(comb, y)
            r["thresholds"] = {"global": tg, "patch": tp}
            if a.per_type:  # the map lifted by its image's global score, both over their thresholds
                lifted = m_test / tp + (g_test / tg)[:, None, None]
                r["combined_pixel_roc_auc"] = roc_auc(lifted.reshape(-1), masks.reshape(-1))
        if a.per_type:  # each defect type against the normal test images: which type holds the figure down
            r["per_type"] = {}
            for t, cls in enumerate(info["test"].classes):
                if t == normal:
                    continue
                sel = (te_y == t) | (te_y == normal)
                r["per_type"][cls] = {"images": int((te_y == t).sum()), "image_roc_auc": roc_auc(p_test[sel], y[sel]),
                                      "pixel_roc_auc": roc_auc(m_test[sel].reshape(-1), masks[sel].reshape(-1)),
                                      "defect_pixel_share": float(masks[te_y == t].mean()),
                                      "pooled_pixel_roc_auc_without": roc_auc(m_test[te_y != t].reshape(-1),
                                                                              masks[te_y != t].reshape(-1))}
        res[name] = r
        print(f"{name}: image {r['image_roc_auc']:.4f} pixel {r['pixel_roc_auc']:.4f}"
              + (f" combined {r['combined_image_roc_auc']:.4f}" if "combined_image_roc_auc" in r else "")
              + f" ({r['bank_patches']} patches, {r['bank_bytes_per_image']} B/image, {r['seconds']:.0f}s)", flush=True)
        if a.per_type:
            print("  per type (image / pixel / pooled pixel without it): "
                  + ", ".join(f"{k} {v['image_roc_auc']:.3f} / {v['pixel_roc_auc']:.3f} / "
                              f"{v['pooled_pixel_roc_auc_without']:.3f}" for k, v in r["per_type"].items())
                  + (f"; lifted map pixel {r['combined_pixel_roc_auc']:.4f}" if "combined_pixel_roc_auc" in r else ""),
                  flush=True)

    out = {"data": "magnetic-tile", "split": "make-shards --exts jpg --normal-class MT_Free --train-fraction 0.7 --seed 0",
           "image_size": a.size, "resize_mode": "squash", "backbone": a.backbone, "patch": spec.to_dict(),
           "grid": [h, w], "patch_dimension": c, "train_images": len(tr_keys), "bank_images": int((~cal).sum()),
           "calibration_images": int(cal.sum()), "test_images": len(te_keys), "test_defective": int(y.sum()),
           "embed_seconds": t_embed, "seconds": time.perf_counter() - t0, "results": res,
           "command": "nice -n 19 python infra/results/quality/maps/tiles_patch.py " + " ".join(argv or sys.argv[1:])}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
