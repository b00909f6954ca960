"""Issue 26: which signal, computed from normal images alone, tells a fine-tuning run that hurts
from one that helps? Trains one class with the product's loop (run_worker) and, after every
epoch, embeds the normal training images and the test set with that epoch's checkpoint; writes,
per epoch, the test ROC-AUC (which needs the anomalies) beside candidate signals that need none:

- normal_cos: the mean pairwise cosine of the normal training features (the loop's collapse_rise
  alarm watches its rise);
- gap: the mean kNN score (k = 2) of held-out normals against the training bank over the mean
  leave-one-out kNN score of the training normals against the rest of the bank (overfitting to the
  training images raises it);
- locality: the held-out normals' mean kNN score over their mean squared distance to the bank
  (how near the nearest normal is, against how near normal images are on the whole);
- loo_locality: the same from the training normals alone (each one's leave-one-out kNN score over
  the mean squared distance between training normals): no hold-out needed;
- uniformity: log E exp(-2 ||z_i - z_j||^2) over pairs of normal training features (Wang & Isola);
- eff_rank: the effective rank (exp of the entropy of the normalised singular values) of the
  centred normal training features.

The held-out normals are the test set's normals (the study's convenience). On MNIST they are
written by other people than the training digits, so ``gap`` and ``locality`` here also measure
that shift: with a seeded tenth of the training normals held out instead (tried in the loop,
reverted), ``locality`` no longer rose for digit 9 (README.md in this folder). Run from the
repository root, e.g.:

    python infra/results/quality/natural/signals.py --data ../shared/datasets/cifar10-subset \
        --exts jpg --image-size 64 --classes dog deer --lr 1e-3 --json-out OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

import numpy as np
import torch

from msc_dist import checkpoint as ckpt
from msc_dist.backbones import build_model
from msc_dist.bench.quality import prepare
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.features import place
from msc_dist.metrics import roc_auc
from msc_dist.scoring import knn_score
from msc_dist.train.config import TrainConfig
from msc_dist.train.loop import DataPlan, embed_counts, run_worker


def loo_knn(z: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's kNN score against the other rows (itself left out)."""
    sims = z @ z.T
    sims.fill_diagonal_(-2.0)
    top = sims.topk(k, dim=1).values
    return (2 - 2 * top).clamp_min(0).sum(1)


def signals(bank: torch.Tensor, held: torch.Tensor, k: int) -> dict:
    n = bank.shape[0]
    sims = bank @ bank.T
    off = ~torch.eye(n, dtype=torch.bool)
    sq = (2 - 2 * sims[off]).clamp_min(0)
    held_knn = knn_score(held, bank, k=k)
    loo = loo_knn(bank, k)
    zc = bank - bank.mean(0, keepdim=True)
    s = torch.linalg.svdvals(zc.double())
    p = s / s.sum()
    return {
        "normal_cos": float(sims[off].mean()),
        "gap": float(held_knn.mean() / loo.mean()),
        "locality": float(held_knn.mean() / k / (2 - 2 * (held @ bank.T)).clamp_min(0).mean()),
        "loo_locality": float(loo.mean() / k / sq.mean()),
        "uniformity": float(torch.log(torch.exp(-2 * sq).mean())),
        "eff_rank": float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())),
    }


def study(prep, cfg: TrainConfig, log) -> list[dict]:
    dev = torch.device("cpu")
    label = prep.label
    plan = DataPlan(kept_counts(prep.train, LabelFilter(frozenset([label]))), [label], None)
    test_counts = kept_counts(prep.test, LabelFilter(None))
    rows: list[dict] = []

    def report(metrics: dict, folder: str | None) -> None:
        if folder is None:
            return
        model = place(build_model(cfg.backbone, cfg.weights), dev)
        model.load_state_dict(ckpt.load(folder).model_state)
        model.eval()
        bank = embed_counts(cfg, model, plan.train_counts, LabelFilter(frozenset([label])), dev).z
        ev = embed_counts(cfg, model, test_counts, LabelFilter(None), dev)
        normal = ev.labels.numpy() == label
        scores = knn_score(ev.z, bank, k=cfg.knn_k).numpy()
        row = {"epoch": int(metrics["epoch"]), "roc_auc": roc_auc(scores, ~normal),
               **signals(bank, ev.z[torch.from_numpy(normal)], cfg.knn_k)}
        rows.append(row)
        log(f"class {prep.normal}: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in row.items()))

    run_worker(cfg, plan, report, None, dev)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--classes", nargs="+", required=True)
    ap.add_argument("--exts", nargs="*")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--resize-mode", default="center_crop")
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--max-test", type=int)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", required=True)
    a = ap.parse_args(argv)
    cfg = dataclasses.replace(TrainConfig(**TrainConfig.PRESETS["fast"]), lr=a.lr, epochs=a.epochs, seed=a.seed,
                              image_size=a.image_size, resize_mode=a.resize_mode, loader_workers=0,
                              collapse_rise=0.0, eval_every=10_000)
    out = {"config": dataclasses.asdict(cfg), "classes": {}}
    for c in a.classes:
        with tempfile.TemporaryDirectory(prefix="msc-signals-") as tmp:
            prep = prepare(a.data, c, tmp, a.max_train, a.max_test, a.exts)
            out["classes"][c] = study(prep, cfg, lambda m: print(m, file=sys.stderr, flush=True))
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
