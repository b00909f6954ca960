"""The one-class protocol in one process, for a single GPU (or a quick CPU probe).

Same code as the jobs, without Ray: ``run_worker`` trains (single process, so the collectives are
no-ops), the final model embeds the normal training set, a seeded hashed-id hold-out of those
normals calibrates the threshold (as the embedding job does), the rest is the kNN bank, and the
test set is scored with the same metrics as ``msc_dist.evaluate``. Use it to measure quality
where Ray is not installed or to sweep settings quickly; ``msc_dist.evaluate`` is the product
path and also writes plots.

Data: an MNIST-format npz (each digit in turn) or an image folder with a class per subfolder
(the magnetic tiles: a seeded 70/30 split of the normal class, every other class is an anomaly).
``max_train`` / ``max_test`` take seeded subsets (a CPU-sized run). Every method and seed of a
class runs on the same shards; ``--seeds`` repeats the training per seed and reports the mean and
the spread. ``--loop reference`` trains with the paper's loop written plainly (bench/reference.py)
on the same shards, hold-out, bank and metrics.

Patch methods (issue 27): ``patch`` takes the patch features of the frozen ImageNet trunk,
``msc-patch`` those of the fine-tuned MSC model (trained once with ``msc`` when both run). The
bank is each non-held-out normal image's ``budget`` patches (msc_dist.patches: per image, seeded),
the image score is the anomaly map's maximum, its threshold calibrated on the same hold-out; where
the test shards carry masks (the magnetic tiles: make-shards packs them), ``pixel_roc_auc`` and
``pro`` measure the maps against them (a bad mask is a counted skip, ``mask_skips``)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from msc_dist.backbones import build_model
from msc_dist.data.labels import resolve_label
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.data.make_shards import from_npz, make_shards
from msc_dist.data.shards import DatasetInfo, iter_samples
from msc_dist.embed.workers import held_out
from msc_dist.features import autocast, place, unit_input
from msc_dist.index import threshold_at_fpr
from msc_dist.metrics import pixel_roc_auc, pro, summary
from msc_dist.scoring import knn_score
from msc_dist import checkpoint as ckpt
from msc_dist.train.config import TrainConfig
from msc_dist.train.loop import DataPlan, embed_counts, format_epoch, run_worker

# msc-PRESET (msc-fast, msc-natural): that TrainConfig.PRESETS entry over the given settings (its
# keys win over the flags); msc itself is the settings as given (paper's by default).
# patch / msc-patch: anomaly maps from the frozen / the fine-tuned (msc) trunk's patch features.
PRESET_METHODS = {f"msc-{name}": name for name in TrainConfig.PRESETS if name != "paper"}
METHODS = ("knn", "msc", *PRESET_METHODS, "msc-noangular", "patch", "msc-patch")
PATCH_METHODS = {"patch": "frozen", "msc-patch": "msc"}  # method -> PatchSpec.source
LOOPS = ("ours", "reference")
METRICS = ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr")
PIXEL_METRICS = ("pixel_roc_auc", "pro")  # patch methods on data with masks
PATCH_METRICS = ("combined_roc_auc",) + PIXEL_METRICS  # patch methods (combined: with a calibration hold-out)
PATCH_MODELS = ("msc", *PRESET_METHODS, "msc-noangular")  # the trained method whose trunk msc-patch takes


def method_config(base: TrainConfig, method: str) -> TrainConfig:
    if method == "knn":
        return dataclasses.replace(base, epochs=0)
    if method == "msc-noangular":
        return dataclasses.replace(base, angular_weight=0.0)
    if method in PRESET_METHODS:
        preset = PRESET_METHODS[method]
        return dataclasses.replace(base, **TrainConfig.PRESETS[preset], preset=preset)
    return base


@dataclasses.dataclass
class Prepared:
    """One class's benchmark data, written once as shards and shared by every method and seed."""

    normal: str
    label: int
    train: DatasetInfo  # the normal training images
    test: DatasetInfo  # every test image, labelled


def prepare(data: str, normal: str, out: str, max_train: int | None = None, max_test: int | None = None,
            exts: list[str] | None = None, groups: str | None = None) -> Prepared:
    if data.endswith(".npz"):
        if groups:
            raise ValueError("groups apply to image folders (an npz keeps its own train/test split)")
        d = np.load(data)
        label = int(normal)
        rng = np.random.default_rng(label)  # the same subsets for every method, seed and loop
        tr = np.flatnonzero(d["y_train"] == label)
        te = np.arange(len(d["y_test"]))
        if max_train and len(tr) > max_train:
            tr = np.sort(rng.choice(tr, max_train, replace=False))
        if max_test and len(te) > max_test:
            te = np.sort(rng.choice(te, max_test, replace=False))
        idx_tr = d["idx_train"][tr] if "idx_train" in d else tr
        idx_te = d["idx_test"][te] if "idx_test" in d else te
        sub = os.path.join(out, "subset.npz")
        np.savez(sub, x_train=d["x_train"][tr], y_train=d["y_train"][tr], idx_train=idx_tr,
                 x_test=d["x_test"][te], y_test=d["y_test"][te], idx_test=idx_te)
        info = from_npz(sub, out, 2000, normal)
        return Prepared(normal, label, info["train"], info["test"])
    info = make_shards(data, out, exts, 1000, normal, 0.7, 0, groups=groups)
    if max_train or max_test:
        raise ValueError("max_train / max_test apply to npz data only (image folders are split 70/30)")
    return Prepared(normal, resolve_label(normal, info["test"].classes), info["train"], info["test"])


def _samples(info: DatasetInfo, keep: LabelFilter) -> tuple[list[str], list[bytes], np.ndarray]:
    keys, datas, labels = [], [], []
    for sh in info.shards:
        for s in iter_samples(sh.url):
            if keep(s.label):
                keys.append(s.key)
                datas.append(s.data)
                labels.append(-1 if s.label is None else s.label)
    return keys, datas, np.asarray(labels)


def _metrics_from(z_train: torch.Tensor, keys: list[str], z_test: torch.Tensor, y_test: np.ndarray, normal: set[int],
                  cfg: TrainConfig, calibration_fraction: float, target_fpr: float) -> dict:
    """The same hold-out (hashed keys), bank, threshold and metrics for both loops."""
    cal = held_out(keys, calibration_fraction, cfg.seed)
    bank, cal_z = z_train[torch.from_numpy(~cal)], z_train[torch.from_numpy(cal)]
    thr = threshold_at_fpr(knn_score(cal_z, bank, k=cfg.knn_k).numpy(), target_fpr) if cal.any() else None
    s = knn_score(z_test, bank, k=cfg.knn_k).numpy()
    y = ~np.isin(y_test, list(normal))
    return summary(s, y, thr) | {"test_samples": int(len(s)), "index_size": int(bank.shape[0])}


def run_class_reference(prep: Prepared, base: TrainConfig, methods: list[str], device: torch.device,
                        calibration_fraction: float = 0.1, target_fpr: float = 0.05, log=None) -> dict:
    """``run_class`` with the paper's loop written plainly (bench/reference.py) instead of ours."""
    from msc_dist.bench.reference import transforms, embed_with, train_reference

    label = prep.label
    keys, x_train, _ = _samples(prep.train, LabelFilter(frozenset([label])))
    _, x_test, y_test = _samples(prep.test, LabelFilter(None))
    out: dict = {}
    for m in methods:
        cfg = method_config(base, m)
        epochs: list = []
        evals = [0.0]
        t0 = time.perf_counter()
        test_tf = transforms(cfg.image_size, cfg.crop_min_scale, cfg.hflip)[1]

        def on_epoch(epoch, model, loss, cfg=cfg, epochs=epochs, test_tf=test_tf, evals=evals, m=m):
            if base.eval_every > 0 and cfg.epochs > 0:  # ROC-AUC per epoch against the whole normal set
                t = time.perf_counter()
                z_tr = embed_with(model, x_train, test_tf, cfg, device)
                z_te = embed_with(model, x_test, test_tf, cfg, device)
                auc = _metrics_from(z_tr, keys, z_te, y_test, {label}, cfg, 0.0, target_fpr)["roc_auc"]
                epochs.append((epoch, auc))
                evals[0] += time.perf_counter() - t
                if log is not None:
                    log(f"class {prep.normal} {m} (reference): epoch {epoch} | loss {loss} | roc_auc {auc:.4f}")

        model, _ = train_reference(x_train, cfg, device, on_epoch=on_epoch)
        train_s = time.perf_counter() - t0 - evals[0]
        z_tr, z_te = embed_with(model, x_train, test_tf, cfg, device), embed_with(model, x_test, test_tf, cfg, device)
        out[m] = _metrics_from(z_tr, keys, z_te, y_test, {label}, cfg, calibration_fraction, target_fpr) | {
            "epoch_auc": epochs, "seconds": time.perf_counter() - t0, "train_seconds": train_s}
    return out


def _final_metrics(cfg: TrainConfig, model, plan: DataPlan, device, calibration_fraction: float,
                   target_fpr: float) -> dict:
    model.eval()
    normal = set(plan.normal_labels)
    tr = embed_counts(cfg, model, plan.train_counts, LabelFilter(frozenset(normal)), device)
    te = embed_counts(cfg, model, plan.eval_counts, LabelFilter(None), device)
    return _metrics_from(tr.z, tr.keys, te.z, te.labels.numpy(), normal, cfg, calibration_fraction, target_fpr)


def _patch_batches(ext, pre, info: DatasetInfo, keep: LabelFilter, device, masks: bool, batch: int = 32):
    """(samples, (b, D) unit vectors, (b, h, w, C) patches) of the kept samples from one forward,
    decoded by ``pre``, ``batch`` at a time (undecodable ones are left out: the global methods
    count them the same way)."""
    from msc_dist.data.decode import BadImage

    pending: list = []

    def run():
        x = torch.from_numpy(np.stack([a for _, a in pending])).permute(0, 3, 1, 2)
        with torch.no_grad(), autocast(device):
            z, p = ext(unit_input(x, device))
        out = ([s for s, _ in pending], z.float().cpu(), p.float().cpu().numpy())
        pending.clear()
        return out

    for sh in info.shards:
        for s in iter_samples(sh.url, masks=masks):
            if not keep(s.label):
                continue
            try:
                pending.append((s, pre(s.data)))
            except BadImage:
                continue
            if len(pending) == batch:
                yield run()
    if pending:
        yield run()


def patch_metrics(cfg: TrainConfig, model, prep: Prepared, device, spec, calibration_fraction: float,
                  target_fpr: float) -> dict:
    """One patch method: the bank of the non-held-out normal training images' patches (``spec``'s
    budget per image), the maps of the held-out normals set the threshold of the image score (the
    map's maximum), then the test set's image metrics and, where it has masks, the pixel metrics.
    The same forward's pooled vectors give the ``combined`` score (msc_dist.patches.combined_scores:
    the global kNN and the map's maximum, each over its threshold on the same hold-out), reported
    as ``combined_roc_auc``."""
    from msc_dist.card import preprocess_of
    from msc_dist.data.masks import MaskSkip, MaskSkips, sample_mask
    from msc_dist.patches import (PatchExtractor, anomaly_map, bank_rows, combined_scores, nearest, new_bank_index,
                                  patch_scores)

    model.eval()
    pre = preprocess_of({"backbone": cfg.backbone, "image_size": cfg.image_size, "resize_mode": cfg.resize_mode})
    ext = PatchExtractor(model, spec)
    t0 = time.perf_counter()
    try:
        rows, cal_p, grid, bank_z, cal_z = [], [], None, [], []
        for smp, z, p in _patch_batches(ext, pre, prep.train, LabelFilter(frozenset([prep.label])), device, False):
            b, h, w, c = p.shape
            grid = (h, w)
            cal = held_out([s.key for s in smp], calibration_fraction, cfg.seed)
            if (~cal).any():
                rows.append(bank_rows(p[~cal], spec, [s.key for s, k in zip(smp, cal) if not k]).reshape(-1, c))
                bank_z.append(z[torch.from_numpy(~cal)])
            if cal.any():
                cal_p.append(p[cal].reshape(int(cal.sum()), h * w, c))
                cal_z.append(z[torch.from_numpy(cal)])
        if not rows:
            raise ValueError(f"class {prep.normal}: no normal training image left for the patch bank")
        index = new_bank_index(rows[0].shape[1])
        index.add(np.ascontiguousarray(np.concatenate(rows)))
        bank_s = time.perf_counter() - t0

        def maps_of(p):
            return anomaly_map(nearest(index, p).reshape(len(p), *grid), cfg.image_size, spec.sigma)

        bank_z = torch.cat(bank_z)
        thr = (threshold_at_fpr(np.concatenate([patch_scores(maps_of(p)) for p in cal_p]), target_fpr)
               if cal_p else None)
        g_thr = threshold_at_fpr(knn_score(torch.cat(cal_z), bank_z, k=cfg.knn_k).numpy(), target_fpr) if cal_z else None
        scores, g_scores, y, maps, masks, skips = [], [], [], [], [], MaskSkips()
        has_masks = bool(prep.test.mask_count)
        for smp, z, p in _patch_batches(ext, pre, prep.test, LabelFilter(None), device, has_masks):
            m = maps_of(p.reshape(len(p), -1, p.shape[-1]))
            scores.append(patch_scores(m))
            g_scores.append(knn_score(z, bank_z, k=cfg.knn_k).numpy())
            for s, mm in zip(smp, m):
                y.append(s.label != prep.label)
                if has_masks:
                    try:
                        masks.append(sample_mask(s, pre, s.label != prep.label))
                        maps.append(mm)
                    except MaskSkip as e:
                        skips.add(s.key, e)
        s_all, y = np.concatenate(scores), np.asarray(y)
        out = summary(s_all, y, thr) | {"test_samples": int(len(s_all)), "index_size": int(index.ntotal),
                                        "bank_bytes_per_image": int(min(spec.budget, grid[0] * grid[1]) * index.d * 4),
                                        "bank_seconds": bank_s, "patch": spec.to_dict()}
        if thr is not None and g_thr is not None:
            out["combined_roc_auc"] = summary(combined_scores(np.concatenate(g_scores), s_all, g_thr, thr), y,
                                              None)["roc_auc"]
        if has_masks:
            out |= {"pixel_roc_auc": pixel_roc_auc(maps, masks), "pro": pro(maps, masks, 0.3),
                    "pixel_samples": len(masks), "mask_skips": dict(skips.counts)}
        return out | {"seconds": time.perf_counter() - t0}
    finally:
        ext.close()


def run_class(prep: Prepared, base: TrainConfig, methods: list[str], device: torch.device,
              calibration_fraction: float = 0.1, target_fpr: float = 0.05, log=None, patch=None,
              patch_model: str = "msc") -> dict:
    """``patch``: the PatchSpec fields of the patch methods over the backbone's defaults
    (``PatchSpec.default``; its ``source`` is the method's). ``patch_model``: the trained method
    (PATCH_MODELS) whose model msc-patch takes."""
    from msc_dist.patches import PatchSpec

    out: dict = {}
    label = prep.label
    spec_of = {m: PatchSpec.default(base.backbone, **(patch or {}), source=src) for m, src in PATCH_METHODS.items()
               if m in methods}
    plan = DataPlan(kept_counts(prep.train, LabelFilter(frozenset([label]))), [label],
                    kept_counts(prep.test, LabelFilter(None)))
    # eval_every <= 0: no ROC-AUC per epoch (each costs a pass over the test set), final metrics only
    train_plan = plan if base.eval_every > 0 else dataclasses.replace(plan, eval_counts=None)
    if patch_model not in PATCH_MODELS:
        raise ValueError(f"unknown patch model {patch_model!r}; valid: {list(PATCH_MODELS)}")
    # msc-patch takes the patch_model's model: trained once for both (and for msc-patch alone)
    trained = [m for m in methods if m not in ("knn", *PATCH_METHODS)]
    if "msc-patch" in methods and patch_model not in trained:
        trained.append(patch_model)
    for m in trained:
        cfg = dataclasses.replace(method_config(base, m), eval_every=max(1, base.eval_every))
        epochs, last = [], {}
        t0 = time.perf_counter()

        def report(metrics: dict, folder: str | None, m=m, cfg=cfg, epochs=epochs, last=last) -> None:
            epochs.append({k: metrics[k] for k in ("epoch", "loss", "roc_auc", "feature_cos", "normal_cos", "zc_norm", "lr", "collapsed",
                                                   "images_per_s", "epoch_seconds", "center_seconds") if k in metrics})
            if log is not None:
                log(f"class {prep.normal} {m}: {format_epoch(metrics)}")
            if folder is not None:  # the last published epoch (a collapse stop can end the run early)
                last["state"] = ckpt.load(folder).model_state

        run_worker(cfg, train_plan, report, None, device)
        model = place(build_model(cfg.backbone, cfg.weights), device)
        model.load_state_dict(last["state"])
        train_s = sum(e.get("center_seconds", 0.0) + e.get("epoch_seconds", 0.0) for e in epochs)
        if m in methods:
            out[m] = _final_metrics(cfg, model, plan, device, calibration_fraction, target_fpr) | {
                "epoch_auc": [(e["epoch"], e.get("roc_auc")) for e in epochs],
                "epochs": epochs,
                "train_images_per_s": [e["images_per_s"] for e in epochs if "images_per_s" in e],
                "seconds": time.perf_counter() - t0,
                "train_seconds": train_s}
        if m == patch_model and "msc-patch" in methods:
            out["msc-patch"] = patch_metrics(cfg, model, prep, device, spec_of["msc-patch"], calibration_fraction,
                                             target_fpr) | {"train_seconds": train_s}
    if "knn" in methods or "patch" in methods:
        t0 = time.perf_counter()
        model = place(build_model(base.backbone, base.weights), device)
        if "knn" in methods:
            out["knn"] = _final_metrics(base, model, plan, device, calibration_fraction, target_fpr) | {
                "seconds": time.perf_counter() - t0}
        if "patch" in methods:
            out["patch"] = patch_metrics(base, model, prep, device, spec_of["patch"], calibration_fraction, target_fpr)
    return out


def _over_seeds(runs: list[dict]) -> dict:
    """One method on one class over seeds: the mean of each metric, its standard deviation
    (``<metric>_std``), the mean ROC-AUC per epoch, and every seed's own result."""
    out: dict = {}
    for k in METRICS + PATCH_METRICS + ("seconds", "train_seconds", "bank_seconds", "test_samples", "index_size",
                                        "pixel_samples", "bank_bytes_per_image"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = float(np.mean(vals))
            if k in METRICS + PATCH_METRICS:
                out[k + "_std"] = float(np.std(vals))
    curves = [r.get("epoch_auc") or [] for r in runs]
    if curves and curves[0]:
        n = min(len(c) for c in curves)
        # None where an epoch was not evaluated (--eval-every 0)
        out["epoch_auc"] = [(curves[0][i][0], float(np.mean([c[i][1] for c in curves]))
                             if all(c[i][1] is not None for c in curves) else None) for i in range(n)]
    out["seeds"] = runs
    return out


def bench_quality(data: str, classes: list[str], base: TrainConfig, methods: list[str], device: str,
                  time_budget_s: float | None = None, log=print, on_class=None, loop: str = "ours",
                  seeds: list[int] | None = None, max_train: int | None = None, max_test: int | None = None,
                  exts: list[str] | None = None, plot_dir: str | None = None, patch: dict | None = None,
                  patch_model: str = "msc", groups: str | None = None) -> dict:
    """Each class in turn as the normal one; stops starting new classes once the budget is spent.
    ``on_class(partial_result)`` runs after every class, so a killed run keeps what it finished.
    ``loop``: ours (the product's training loop) or reference (the paper's, written plainly).
    ``seeds``: train each method once per seed (default: the config's seed). ``patch``: PatchSpec
    fields (stages, pool, budget, sigma) of the patch methods over the backbone's defaults."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {list(METHODS)}")
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; valid: {list(LOOPS)}")
    if patch_model not in PATCH_MODELS:
        raise ValueError(f"unknown patch model {patch_model!r}; valid: {list(PATCH_MODELS)}")
    if loop == "reference" and any(m in PATCH_METHODS for m in methods):
        raise ValueError(f"the patch methods {list(PATCH_METHODS)} run with --loop ours only")
    run = run_class if loop == "ours" else run_class_reference
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seeds = list(seeds) if seeds else [base.seed]
    t0, per_class = time.perf_counter(), {}
    extra = {"loop": loop, "seeds": seeds, "max_train": max_train, "max_test": max_test,
             "split_by": "groups" if groups else "image"}
    if "msc-patch" in methods:
        extra["patch_model"] = patch_model
    res = _result(data, per_class, methods, base, device, t0) | extra
    for c in classes:
        if time_budget_s is not None and per_class and time.perf_counter() - t0 > time_budget_s:
            log(f"time budget spent: stopping before class {c}")
            break
        with tempfile.TemporaryDirectory(prefix="msc-quality-") as tmp:
            prep = prepare(data, c, tmp, max_train, max_test, exts, groups)
            extra_kw = {"patch": patch, "patch_model": patch_model} if loop == "ours" else {}
            runs = [run(prep, dataclasses.replace(base, seed=s), methods, dev, log=log, **extra_kw) for s in seeds]
        per_class[c] = {m: _over_seeds([r[m] for r in runs]) for m in methods}
        log(f"class {c}: " + ", ".join(f"{m} {per_class[c][m]['roc_auc']:.4f}" + (
            f" (pixel {per_class[c][m]['pixel_roc_auc']:.4f}, PRO {per_class[c][m]['pro']:.4f})"
            if "pro" in per_class[c][m] else "") for m in methods))
        if plot_dir:
            plot_class(plot_dir, c, per_class[c], loop, base)
        res = _result(data, per_class, methods, base, device, t0) | extra
        if on_class is not None:
            on_class(res)
    return res


def plot_class(plot_dir: str, c: str, per_method: dict, loop: str, base: TrainConfig) -> str:
    """ROC-AUC per epoch of each trained method (the mean over seeds, each seed faint). The
    training loop's own evaluation: its kNN bank is every normal training image (no calibration
    hold-out), so its values differ a little from the final metrics in the tables."""
    from msc_dist.evaluate.plots import epoch_auc_plot

    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, f"epoch_auc_{loop}_{c}.png")
    curves = {m: ([r.get("epoch_auc") or [] for r in v["seeds"]], v.get("epoch_auc") or [])
              for m, v in per_method.items() if v.get("epoch_auc")}
    epoch_auc_plot(path, curves, f"normal class {c}: ROC-AUC per epoch ({loop} loop, {base.image_size} px)")
    return path


def _result(data, per_class, methods, base, device, t0) -> dict:
    mean: dict = {}
    if per_class:
        for m in methods:
            mean[m] = {k: float(np.mean([per_class[c][m][k] for c in per_class])) for k in METRICS + PATCH_METRICS
                       if all(k in per_class[c][m] for c in per_class)}
            # the spread of the class-mean over seeds
            n_seeds = min(len(per_class[c][m]["seeds"]) for c in per_class)
            by_seed = [np.mean([per_class[c][m]["seeds"][i]["roc_auc"] for c in per_class]) for i in range(n_seeds)]
            mean[m]["roc_auc_std"] = float(np.std(by_seed))
            mean[m]["seconds"] = float(np.mean([per_class[c][m].get("seconds", 0.0) for c in per_class]))
    return {"bench": "quality", "data": os.path.basename(os.path.normpath(data)), "classes": per_class, "mean": mean,
            "config": dataclasses.asdict(base), "device": device, "seconds": time.perf_counter() - t0,
            "torch": torch.__version__}
