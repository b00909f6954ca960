"""One-class evaluation: for each normal class, split, train through the Ray Train job, embed
and index through the embedding job, score the test set through the offline scoring job, and
compare methods on the same split. Writes results.json, results.md and plots/ in the run folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from msc_dist import storage
from msc_dist.config import ConfigError, check_ranges, project
from msc_dist.data.make_shards import from_folder, from_npz, sample_key
from msc_dist.data.labels import resolve_label
from msc_dist.data.shards import DataError, describe, iter_samples
from msc_dist.embed.config import EmbedConfig
from msc_dist.embed.job import main as embed_main
from msc_dist.evaluate import plots
from msc_dist.evaluate.config import VALID_METHODS, EvalConfig
from msc_dist.evaluate.report import Scored, shard_images, write_plots
from msc_dist.metrics import summary
from msc_dist.progress import bar
from msc_dist.score.config import ScoreConfig
from msc_dist.score.job import main as score_main, read_scores
from msc_dist.train.config import TrainConfig
from msc_dist.train.job import main as train_main

log = logging.getLogger("msc_dist.evaluate")
METRIC_COLS = ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr", "f1_max")
THRESHOLD_COLS = ("threshold", "f1_max_threshold")  # calibrated on held-out normals; F1-optimal on the test set


def list_classes(data: str) -> list[str]:
    if data.endswith(".npz"):
        y = np.load(data)["y_test"]
        return [str(c) for c in sorted(set(int(v) for v in y))]
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "test")):
        return describe(os.path.join(data, "test")).classes or []
    return sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)))


def prepare_split(cfg: EvalConfig, normal: str, out: str) -> tuple[str, str, dict[str, str]]:
    """Shards for one normal class: (train dir, test dir, key -> source path for masks).
    Sets without a given split get a seeded one, written to OUT/split.json."""
    if cfg.groups and (cfg.data.endswith(".npz") or os.path.isdir(os.path.join(cfg.data, "train"))):
        raise ConfigError("--groups splits an image folder's normal class; this set has its own train/test split")
    if cfg.data.endswith(".npz"):
        from_npz(cfg.data, out, 2000, normal)
        return os.path.join(out, "train"), os.path.join(out, "test"), {}
    if os.path.isdir(os.path.join(cfg.data, "train")):
        return os.path.join(cfg.data, "train"), os.path.join(cfg.data, "test"), {}
    from_folder(cfg.data, out, [e.lower() for e in (cfg.exts or ["jpg", "jpeg", "png", "webp"])], 1000, normal,
                cfg.train_fraction, cfg.seed, groups=cfg.groups)
    split = json.load(open(os.path.join(out, "split.json")))
    sources = {sample_key(r): os.path.join(cfg.data, r) for r in split["test"]}
    return os.path.join(out, "train"), os.path.join(out, "test"), sources


def _epoch_aucs(run_dir: str) -> list[tuple[int, float]]:
    pts = []
    for d in sorted(os.listdir(run_dir)):
        m = os.path.join(run_dir, d, "meta.json")
        if d.startswith("checkpoint_") and os.path.exists(m):
            meta = json.load(open(m))
            if "roc_auc" in meta:
                pts.append((int(meta["epoch"]), float(meta["roc_auc"])))
    return sorted(pts)


def _checkpoint_at(run_dir: str, epoch: int) -> str:
    for d in os.listdir(run_dir):
        m = os.path.join(run_dir, d, "meta.json")
        if d.startswith("checkpoint_") and os.path.exists(m) and json.load(open(m))["epoch"] == epoch:
            return os.path.join(run_dir, d)
    raise FileNotFoundError(f"no epoch-{epoch} checkpoint in {run_dir}")


def evaluate_class(cfg: EvalConfig, normal: str, root: str) -> dict:
    cdir = os.path.join(root, f"class-{normal}")
    train, test, sources = prepare_split(cfg, normal, os.path.join(cdir, "data"))
    info = describe(test)
    normal_label = resolve_label(normal, info.classes)
    # Every training field EvalConfig borrowed from TrainConfig passes through as it is.
    tcfg = project(cfg, TrainConfig, data=train, eval_data=test, normal_classes=[normal],
                   storage_path=os.path.join(cdir, "runs"), keep_checkpoints=cfg.epochs + 1)
    runs: dict[str, str] = {}
    if "msc" in cfg.methods:
        runs["msc"] = train_main(dataclasses.replace(tcfg, name="msc")).run_dir
    if "msc-noangular" in cfg.methods:
        runs["msc-noangular"] = train_main(dataclasses.replace(tcfg, name="msc-noangular", angular_weight=0.0)).run_dir
    if "knn" in cfg.methods and not runs:
        runs["frozen"] = train_main(dataclasses.replace(tcfg, name="frozen", epochs=0)).run_dir
    checkpoints = {m: _checkpoint_at(runs[m], cfg.epochs) for m in ("msc", "msc-noangular") if m in runs}
    if "knn" in cfg.methods:
        checkpoints["knn"] = _checkpoint_at(next(iter(runs.values())), 0)  # epoch 0 = frozen ImageNet features

    labels = {s.key: s.label for sh in info.shards for s in iter_samples(sh.url)}
    res, scored = {}, {}
    for m in [m for m in cfg.methods if m in checkpoints]:
        idx = os.path.join(cdir, f"index-{m}")
        emb = embed_main(EmbedConfig(checkpoint=checkpoints[m], out=idx, calibration_fraction=cfg.calibration_fraction,
                                     target_fpr=cfg.target_fpr, seed=cfg.seed, use_gpu=cfg.use_gpu, ray_address=cfg.ray_address))
        sc = os.path.join(cdir, f"scores-{m}")
        score_main(ScoreConfig(index=idx, input=test, out=sc, use_gpu=cfg.use_gpu, ray_address=cfg.ray_address))
        rows = [r for r in read_scores(sc).to_pylist() if r["error"] is None]
        keys = [r["uri"].rsplit("#", 1)[1] for r in rows]
        s = np.array([r["score"] for r in rows])
        y = np.array([labels[k] != normal_label for k in keys])
        scored[m] = Scored(s, y, keys, emb.manifest.threshold)
        res[m] = summary(s, y, emb.manifest.threshold) | {"test_samples": len(rows), "index_size": emb.manifest.count}

    pdir = os.path.join(root, "plots")
    write_plots(pdir, f"class-{normal}", f"normal class {normal}", scored, res, lambda want: shard_images(info, want),
                sources, cfg.gallery_k)
    series = {m: _epoch_aucs(runs[m]) for m in ("msc", "msc-noangular") if m in runs}
    plots.auc_per_epoch(os.path.join(pdir, f"auc-per-epoch-class-{normal}.png"), series, f"ROC-AUC per epoch, normal class {normal}")
    res["epoch_auc"] = {m: pts for m, pts in series.items()}
    return res


def markdown(results: dict, methods: list[str], cfg: EvalConfig) -> str:
    lines = [f"# One-class evaluation: {cfg.data}", "",
             f"backbone {cfg.backbone}, image size {cfg.image_size}, epochs {cfg.epochs}, batch {cfg.batch_size} x "
             f"{cfg.num_workers} workers, lr {cfg.lr}, crop scale >= {cfg.crop_min_scale}, "
             f"{'' if cfg.hflip else 'no '}flips, seed {cfg.seed}, threshold at {cfg.target_fpr:.0%} FPR on "
             f"{cfg.calibration_fraction:.0%} held-out normals", ""]
    for metric in METRIC_COLS:
        lines += [f"## {metric}", "", "| normal class | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for c, r in results["classes"].items():
            lines.append(f"| {c} | " + " | ".join(f"{r[m][metric]:.4f}" for m in methods) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{results['mean'][m][metric]:.4f}**" for m in methods) + " |")
        lines.append("")
    lines += ["## thresholds (calibrated / F1-optimal on the test set)", "",
              "| normal class | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for c, r in results["classes"].items():
        lines.append(f"| {c} | " + " | ".join(_thresholds(r[m]) for m in methods) + " |")
    lines.append("")
    return "\n".join(lines)


def _thresholds(r: dict) -> str:
    cal = r.get("threshold")
    return f"{'-' if cal is None else f'{cal:.4f}'} / {r['f1_max_threshold']:.4f}"


def main(cfg: EvalConfig) -> dict:
    if not cfg.data:
        raise ConfigError("--data is required")
    check_ranges(cfg)  # EvalConfig.RANGES and the training fields' own
    bad = [m for m in cfg.methods if m not in VALID_METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; valid: {list(VALID_METHODS)}")
    if not (cfg.all_classes or cfg.normal_class):
        raise ConfigError("pass --normal-class NAME or --all-classes")
    classes = list_classes(cfg.data)
    chosen = classes if cfg.all_classes else [cfg.normal_class]
    missing = [c for c in chosen if c not in classes]
    if missing:
        raise DataError(f"class(es) {missing} not in the data; valid classes: {classes}")
    root = os.path.abspath(os.path.expanduser(cfg.out))
    os.makedirs(root, exist_ok=True)
    storage.write_bytes_atomic(os.path.join(root, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1).encode())
    per_class = {}
    with bar(total=len(chosen), desc="evaluate", unit="class") as pb:
        for c in chosen:
            per_class[c] = evaluate_class(cfg, c, root)
            pb.write(f"class {c}: " + ", ".join(f"{m} ROC-AUC {per_class[c][m]['roc_auc']:.4f}" for m in cfg.methods))
            pb.update(1)
    methods = [m for m in cfg.methods]
    mean = {m: {k: float(np.mean([per_class[c][m][k] for c in chosen])) for k in METRIC_COLS} for m in methods}
    results = {"classes": per_class, "mean": mean, "config": dataclasses.asdict(cfg)}
    storage.write_bytes_atomic(os.path.join(root, "results.json"), json.dumps(results, indent=1, default=float).encode())
    storage.write_bytes_atomic(os.path.join(root, "results.md"), markdown(results, methods, cfg).encode())
    return results
