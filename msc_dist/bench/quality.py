"""The one-class protocol in one process, for a single GPU (or a quick CPU probe).

Same code as the jobs, without Ray: ``run_worker`` trains (single process, so the collectives are
no-ops), the final model embeds the normal training set, a seeded hashed-id hold-out of those
normals calibrates the threshold (as the embedding job does), the rest is the kNN bank, and the
test set is scored with the same metrics as ``msc_dist.evaluate``. Use it to measure quality
where Ray is not installed or to sweep settings quickly; ``msc_dist.evaluate`` is the product
path and also writes plots."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from msc_dist.backbones import build_model
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.data.make_shards import from_npz
from msc_dist.embed.workers import held_out
from msc_dist.features import place
from msc_dist.index import threshold_at_fpr
from msc_dist.metrics import summary
from msc_dist.scoring import knn_score
from msc_dist import checkpoint as ckpt
from msc_dist.train.config import TrainConfig
from msc_dist.train.loop import DataPlan, embed_counts, format_epoch, run_worker

METHODS = ("knn", "msc", "msc-noangular")
LOOPS = ("ours", "reference")


def _metrics_from(z_train: torch.Tensor, keys: list[str], z_test: torch.Tensor, y_test: np.ndarray, normal: set[int],
                  cfg: TrainConfig, calibration_fraction: float, target_fpr: float) -> dict:
    """The same hold-out (hashed keys), bank, threshold and metrics for both loops."""
    cal = held_out(keys, calibration_fraction, cfg.seed)
    bank, cal_z = z_train[torch.from_numpy(~cal)], z_train[torch.from_numpy(cal)]
    thr = threshold_at_fpr(knn_score(cal_z, bank, k=cfg.knn_k).numpy(), target_fpr) if cal.any() else None
    s = knn_score(z_test, bank, k=cfg.knn_k).numpy()
    y = ~np.isin(y_test, list(normal))
    return summary(s, y, thr) | {"test_samples": int(len(s)), "index_size": int(bank.shape[0])}


def run_class_reference(npz: str, normal: str, base: TrainConfig, methods: list[str], device: torch.device,
                        calibration_fraction: float = 0.1, target_fpr: float = 0.05, log=print) -> dict:
    """``run_class`` with the paper's loop written plainly (bench/reference.py) instead of ours."""
    from msc_dist.bench.reference import transforms, embed_with, train_reference

    d = np.load(npz)
    label = int(normal)
    sel = d["y_train"] == label
    x_train, x_test, y_test = d["x_train"][sel], d["x_test"], d["y_test"]
    idx = d["idx_train"][sel] if "idx_train" in d else np.flatnonzero(sel)
    keys = [f"train{int(i):06d}" for i in idx]  # the shard keys of make_shards: the same hold-out as ours
    out: dict = {}
    for m in methods:
        cfg = dataclasses.replace(base, angular_weight=0.0 if m == "msc-noangular" else base.angular_weight,
                                  epochs=0 if m == "knn" else base.epochs)
        epochs: list = []
        t0 = time.perf_counter()
        test_tf = transforms(cfg.image_size, cfg.crop_min_scale, cfg.hflip)[1]

        def on_epoch(epoch, model, loss, cfg=cfg, epochs=epochs, test_tf=test_tf):
            if base.eval_every > 0 and cfg.epochs > 0:  # ROC-AUC per epoch against the whole normal set
                z_tr = embed_with(model, x_train, test_tf, cfg, device)
                z_te = embed_with(model, x_test, test_tf, cfg, device)
                epochs.append((epoch, _metrics_from(z_tr, keys, z_te, y_test, {label}, cfg, 0.0, target_fpr)["roc_auc"]))

        model, _ = train_reference(x_train, cfg, device, on_epoch=on_epoch)
        z_tr, z_te = embed_with(model, x_train, test_tf, cfg, device), embed_with(model, x_test, test_tf, cfg, device)
        out[m] = _metrics_from(z_tr, keys, z_te, y_test, {label}, cfg, calibration_fraction, target_fpr) | {
            "epoch_auc": epochs, "seconds": time.perf_counter() - t0}
    return out


def _final_metrics(cfg: TrainConfig, model, plan: DataPlan, device, calibration_fraction: float,
                   target_fpr: float) -> dict:
    model.eval()
    normal = set(plan.normal_labels)
    tr = embed_counts(cfg, model, plan.train_counts, LabelFilter(frozenset(normal)), device)
    te = embed_counts(cfg, model, plan.eval_counts, LabelFilter(None), device)
    return _metrics_from(tr.z, tr.keys, te.z, te.labels.numpy(), normal, cfg, calibration_fraction, target_fpr)


def run_class(npz: str, normal: str, base: TrainConfig, methods: list[str], device: torch.device,
              calibration_fraction: float = 0.1, target_fpr: float = 0.05, log=None) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="msc-quality-") as tmp:
        info = from_npz(npz, tmp, 2000, normal)
        label = int(normal)
        plan = DataPlan(kept_counts(info["train"], LabelFilter(frozenset([label]))), [label],
                        kept_counts(info["test"], LabelFilter(None)))
        # eval_every <= 0: no ROC-AUC per epoch (each costs a pass over the test set), final metrics only
        train_plan = plan if base.eval_every > 0 else dataclasses.replace(plan, eval_counts=None)
        runs = [m for m in methods if m != "knn"]
        for m in runs:
            cfg = dataclasses.replace(base, angular_weight=0.0 if m == "msc-noangular" else base.angular_weight,
                                      eval_every=max(1, base.eval_every))
            epochs, last = [], {}
            t0 = time.perf_counter()

            def report(metrics: dict, folder: str | None) -> None:
                epochs.append({k: metrics[k] for k in ("epoch", "loss", "roc_auc", "images_per_s") if k in metrics})
                if log is not None:
                    log(f"class {normal} {m}: {format_epoch(metrics)}")
                if folder is not None and metrics["epoch"] == cfg.epochs:
                    last["state"] = ckpt.load(folder).model_state

            run_worker(cfg, train_plan, report, None, device)
            model = place(build_model(cfg.backbone, cfg.weights), device)
            model.load_state_dict(last["state"])
            out[m] = _final_metrics(cfg, model, plan, device, calibration_fraction, target_fpr) | {
                "epoch_auc": [(e["epoch"], e.get("roc_auc")) for e in epochs],
                "train_images_per_s": [e["images_per_s"] for e in epochs if "images_per_s" in e],
                "seconds": time.perf_counter() - t0}
        if "knn" in methods:
            model = place(build_model(base.backbone, base.weights), device)
            out["knn"] = _final_metrics(base, model, plan, device, calibration_fraction, target_fpr)
    return out


def bench_quality(npz: str, classes: list[str], base: TrainConfig, methods: list[str], device: str,
                  time_budget_s: float | None = None, log=print, on_class=None, loop: str = "ours") -> dict:
    """Each class in turn as the normal one; stops starting new classes once the budget is spent.
    ``on_class(partial_result)`` runs after every class, so a killed run keeps what it finished.
    ``loop``: ours (the product's training loop) or reference (the paper's, written plainly)."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {list(METHODS)}")
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; valid: {list(LOOPS)}")
    run = run_class if loop == "ours" else run_class_reference
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t0, per_class = time.perf_counter(), {}
    res = _result(npz, per_class, methods, base, device, t0) | {"loop": loop}
    for c in classes:
        if time_budget_s is not None and per_class and time.perf_counter() - t0 > time_budget_s:
            log(f"time budget spent: stopping before class {c}")
            break
        per_class[c] = run(npz, c, base, methods, dev, log=log)
        log(f"class {c}: " + ", ".join(f"{m} {per_class[c][m]['roc_auc']:.4f}" for m in methods))
        res = _result(npz, per_class, methods, base, device, t0) | {"loop": loop}
        if on_class is not None:
            on_class(res)
    return res


def _result(npz, per_class, methods, base, device, t0) -> dict:
    keys = ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr")
    mean = {m: {k: float(np.mean([per_class[c][m][k] for c in per_class])) for k in keys} for m in methods} if per_class else {}
    return {"bench": "quality", "data": os.path.basename(npz), "classes": per_class, "mean": mean,
            "config": dataclasses.asdict(base), "device": device, "seconds": time.perf_counter() - t0,
            "torch": torch.__version__}
