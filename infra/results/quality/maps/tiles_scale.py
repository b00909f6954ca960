"""Patch maps on the magnetic tiles at one pixel scale for every tile, against squash (issue 27).

    python infra/results/quality/maps/tiles_scale.py --scale 0.7 --out infra/results/quality/maps/scale_tiles_0.7.json
    python infra/results/quality/maps/tiles_scale.py --squash 224 --out infra/results/quality/maps/scale_tiles_squash224.json

Squash (the product's mode for the tiles) resizes every tile to S x S, so a tile 103 px wide is
stretched 2.2x and one 618 px wide shrunk 0.36x: the texture reaches the patch features at a
different scale in every tile. ``--scale F`` instead resizes each tile by the one factor F, its
aspect kept (sides rounded to multiples of 32, the trunk's stride), and runs one forward per
image (EfficientNet is fully convolutional; batch 1, so no padding). At F = 0.7 the median tile
has about as many pixels as 224 x 224. Everything else is ``tiles_patch.py``'s: one process, no
Ray, the frozen ImageNet backbone as a 0-epoch checkpoint, its model card's patch extractor (the
default stages, pool and norm), the embedding job's hashed-id hold-out (10 %, seed 0), the greedy
coreset of ``--budget`` patches per image, ``patches.nearest``, the map bilinear to the image's
pixels and smoothed (sigma ``--sigma`` px), the image score the map's maximum. The split is
``msc data make-shards DATA OUT --exts jpg --normal-class MT_Free --train-fraction 0.7 --seed SEED``.

Pixel ROC-AUC two ways: ``pixel_roc_auc`` on the S x S grid of the committed protocol (each map
resized to S x S, the mask squashed to it with nearest neighbour; every image weighs the same),
and ``pixel_roc_auc_own_pixels`` at each tile's own scaled pixels. ``surface``: per class, the
percentiles of each test image's median map value (a tile's defect-free surface: the defects of
every type but Uneven cover under 5 % of it), and the share of that class's defect-free pixels that
score above the median ``MT_Uneven`` defect pixel (what holds the pooled pixel figure down).

``--groups infra/results/quality/maps/tile_groups.json``: the dataset photographs each physical
tile six times (exposures ``exp1`` .. ``exp6``, consecutive frame numbers in the file names), so
make-shards' split by image puts the other exposures of most normal test tiles into the bank.
This splits MT_Free by whole tiles instead (``make-shards --groups``: 70 % of the images to within
one tile, seeded); the defective images stay in test.
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
import torch.nn.functional as F
from PIL import Image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/magnetic-tile")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--scale", type=float, help="resize every tile by this factor, aspect kept")
    mode.add_argument("--squash", type=int, help="resize every tile to S x S (the product's squash)")
    ap.add_argument("--grid", type=int, default=224, help="S of the S x S evaluation grid (default 224)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--budget", type=int, default=32, help="bank patches per normal image (coreset)")
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", default=None,
                    help="split MT_Free by whole groups (tile_groups.json: a tile's six exposures together)")
    ap.add_argument("--out", default=None, help="JSON results (default: print only)")
    a = ap.parse_args(argv)

    from scipy.ndimage import gaussian_filter
    from tiles_patch import frozen_tiles  # this folder's: the same split and frozen card

    from msc_dist.data.make_shards import sample_key
    from msc_dist.embed.workers import held_out
    from msc_dist.features import unit_input
    from msc_dist.patches import PatchSpec, nearest, new_bank_index, select_patches
    from msc_dist.scoring import knn_score, roc_auc

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tiles_scale_")
    _, split, card = frozen_tiles(a.data, tmp, a.backbone, a.squash or a.grid, a.seed, a.groups)
    spec = PatchSpec.default(a.backbone, sigma=a.sigma, seed=a.seed, budget=a.budget, source="msc")  # 0 epochs: frozen
    ext = card.patch_extractor(spec)

    def pixels(rel: str) -> np.ndarray:
        img = Image.open(os.path.join(a.data, rel)).convert("RGB")
        if a.squash:
            size = (a.squash, a.squash)
        else:
            size = tuple(max(32, round(s * a.scale / 32) * 32) for s in img.size)
        return np.asarray(img.resize(size, Image.BILINEAR))

    @torch.no_grad()
    def embed(rels):
        zs, ps, shapes = [], [], []
        for rel in rels:
            x = pixels(rel)
            z, p = ext(unit_input(torch.from_numpy(x.copy()).permute(2, 0, 1)[None], card.device))
            zs.append(z[0].numpy())
            ps.append(p[0].numpy())
            shapes.append(x.shape[:2])
        return np.stack(zs), ps, shapes

    train, test = split["train"], split["test"]
    tr_z, tr_p, tr_shapes = embed(train)
    te_z, te_p, te_shapes = embed(test)
    t_embed = time.perf_counter() - t0
    print(f"embedded {len(train)} train + {len(test)} test tiles ({t_embed:.0f}s)", flush=True)

    cls = np.array([r.split("/")[0] for r in test])
    y = cls != "MT_Free"
    keys = [sample_key(r) for r in train]
    cal = held_out(keys, 0.1, a.seed)
    g = knn_score(torch.from_numpy(te_z), torch.from_numpy(tr_z[~cal]), k=2).numpy()
    c = tr_p[0].shape[-1]
    index = new_bank_index(c)
    for i in np.flatnonzero(~cal):
        p = tr_p[i].reshape(-1, c)
        index.add(np.ascontiguousarray(p[select_patches(p, a.budget, spec.seed, keys[i], "coreset")], np.float32))

    grid_maps, grid_masks, own_s, own_m, img_s = [], [], [], [], []
    for i, rel in enumerate(test):
        gh, gw = te_p[i].shape[:2]
        d = nearest(index, te_p[i].reshape(1, -1, c)).reshape(1, 1, gh, gw)
        h, w = te_shapes[i]
        m = F.interpolate(torch.from_numpy(np.sqrt(np.maximum(d, 0))), size=(h, w), mode="bilinear",
                          align_corners=False)[0, 0].numpy()
        if a.sigma > 0:
            m = gaussian_filter(m, a.sigma, mode="reflect", truncate=4.0)
        mp = os.path.join(a.data, os.path.splitext(rel)[0] + ".png")
        mask = Image.open(mp).convert("L") if os.path.exists(mp) else None
        grid_maps.append(np.asarray(Image.fromarray(m).resize((a.grid, a.grid), Image.BILINEAR)))
        grid_masks.append(np.asarray(mask.resize((a.grid, a.grid), Image.NEAREST)) > 127 if mask
                          else np.zeros((a.grid, a.grid), bool))
        own_s.append(m.ravel())
        own_m.append((np.asarray(mask.resize((w, h), Image.NEAREST)) > 127).ravel() if mask else np.zeros(h * w, bool))
        img_s.append(float(m.max()))
    maps, masks, img_s = np.stack(grid_maps), np.stack(grid_masks), np.array(img_s)

    res = {"global_image_roc_auc": roc_auc(g, y), "patch_image_roc_auc": roc_auc(img_s, y),
           "pixel_roc_auc": roc_auc(maps.ravel(), masks.ravel()),
           "pixel_roc_auc_own_pixels": roc_auc(np.concatenate(own_s), np.concatenate(own_m)), "per_type": {}}
    for t in sorted(set(cls) - {"MT_Free"}):
        sel = (cls == t) | (cls == "MT_Free")
        res["per_type"][t] = {"images": int((cls == t).sum()), "image_roc_auc": roc_auc(img_s[sel], y[sel]),
                              "pixel_roc_auc": roc_auc(maps[sel].ravel(), masks[sel].ravel()),
                              "pooled_pixel_roc_auc_without": roc_auc(maps[cls != t].ravel(), masks[cls != t].ravel())}
    uneven = np.median(maps[(cls == "MT_Uneven")[:, None, None] & masks])
    medians = np.median(maps.reshape(len(maps), -1), axis=1)
    res["surface"] = {"uneven_defect_pixel_median": float(uneven), "classes": {
        t: {"image_median_p10_p50_p90": [float(v) for v in np.percentile(medians[cls == t], [10, 50, 90])],
            "defect_free_pixels_above_uneven_median": float((maps[(cls == t)[:, None, None] & ~masks] > uneven).mean())}
        for t in sorted(set(cls))}}
    areas = np.array([h * w for h, w in tr_shapes + te_shapes])
    split_cmd = f"make-shards --exts jpg --normal-class MT_Free --train-fraction 0.7 --seed {a.seed}"
    out = {"data": "magnetic-tile", "split": split_cmd + (f" --groups {os.path.basename(a.groups)}" if a.groups else ""),
           "split_by": "tile (tile_groups.json)" if a.groups else "image",
           "mode": f"squash {a.squash}" if a.squash else f"scale {a.scale}", "evaluation_grid": a.grid,
           "median_pixels_per_tile": int(np.median(areas)), "backbone": a.backbone, "patch": spec.to_dict(),
           "train_images": len(train), "bank_images": int((~cal).sum()), "bank_patches": int(index.ntotal),
           "test_images": len(test), "test_defective": int(y.sum()), "embed_seconds": t_embed,
           "seconds": time.perf_counter() - t0, "results": res,
           "command": "python infra/results/quality/maps/tiles_scale.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps({k: v for k, v in res.items() if k != "per_type"}, indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
