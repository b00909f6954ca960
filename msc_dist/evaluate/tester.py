"""``msc test``: the evaluation metrics, tables and plots of an existing checkpoint + index on
labelled shards, without training. In this process (no Ray), through the same ``Scorer`` as
serving and offline scoring, so the scores are the ones the endpoint gives."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from msc_dist import storage
from msc_dist.config import ConfigError
from msc_dist.data.shards import DataError, describe, iter_samples
from msc_dist.evaluate.config import TestConfig
from msc_dist.evaluate.report import Scored, shard_images, write_plots
from msc_dist.metrics import summary
from msc_dist.data.labels import resolve_labels
from msc_dist.progress import bar
from msc_dist.scorer import open_scorer

log = logging.getLogger("msc_dist.evaluate")
TABLE_KEYS = ("roc_auc", "average_precision", "fpr_at_95_tpr", "threshold", "f1_at_threshold", "fpr_at_threshold",
              "f1_max_threshold", "f1_max")


def normal_labels(names: list[str], classes: list[str] | None) -> list[int]:
    return resolve_labels(names, classes)


def score_shards(scorer, data: str, batch_size: int) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(keys, scores, labels, errors) of every sample in ``data`` through ``scorer.score_bytes``."""
    info = describe(data)
    keys, scores, labels, errors = [], [], [], []
    pending: list = []

    def flush() -> None:
        for smp, r in zip(pending, scorer.score_bytes([s.data for s in pending])):
            if r.error:
                errors.append((smp.key, r.error))
            else:
                keys.append(smp.key)
                scores.append(r.score)
                labels.append(-1 if smp.label is None else smp.label)
        pending.clear()

    with bar(total=info.count, desc="test", unit="img") as pb:
        for sh in info.shards:
            try:
                for smp in iter_samples(sh.url):
                    pending.append(smp)
                    if len(pending) == batch_size:
                        pb.update(len(pending))
                        flush()
            except storage.NotRegularFile as e:  # a FIFO, device or symlink loop: an error, never a hang
                errors.append((sh.url, f"cannot read shard: {e.strerror}"))
        pb.update(len(pending))
        flush()
    return keys, np.asarray(scores, np.float64), np.asarray(labels, np.int64), errors


def markdown(res: dict, cfg: TestConfig) -> str:
    m = res["metrics"]
    lines = [f"# Test: {cfg.name} on {cfg.data}", "",
             f"checkpoint `{res['checkpoint']}`, index `{cfg.index}` ({res['index_size']} vectors), "
             f"{res['test_samples']} test samples ({res['anomalous']} anomalous), {len(res['errors'])} errors", "",
             "| metric | " + cfg.name + " |", "|---|---|"]
    for k in TABLE_KEYS:
        v = m.get(k)
        lines.append(f"| {k} | {'-' if v is None else f'{v:.4f}'} |")
    lines += ["", "threshold: calibrated on held-out normals by the embedding job; f1_max_threshold: the "
              "F1-optimal one on this test set (optimistic: chosen with the test labels).", ""]
    return "\n".join(lines)


def main(cfg: TestConfig) -> dict:
    if not cfg.index or not cfg.data:
        raise ConfigError("--index and --data are required")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {cfg.batch_size}")
    scorer = open_scorer(cfg.index, cfg.checkpoint, cfg.device, max_pixels=cfg.max_pixels, runtime=cfg.runtime)
    info = describe(cfg.data)
    labels = info.label_counts()
    if None in labels:
        raise DataError(f"test data {cfg.data!r} has {labels[None]} unlabelled samples; every test sample needs a .cls label")
    normal = normal_labels(cfg.normal_classes or scorer.config.get("normal_classes") or ["0"], info.classes)
    if not any(lab in normal for lab in labels) or all(lab in normal for lab in labels):
        raise DataError(f"test data {cfg.data!r} needs both normal {normal} and anomalous samples; its labels are "
                        f"{ {k: v for k, v in labels.items()} }")
    keys, s, lab, errors = score_shards(scorer, cfg.data, cfg.batch_size)
    y = ~np.isin(lab, normal)
    metrics = summary(s, y, scorer.threshold)
    res = {"name": cfg.name, "checkpoint": scorer.checkpoint, "model_id": scorer.model_id, "index": cfg.index,
           "index_size": scorer.index.count, "data": cfg.data, "normal_labels": normal, "test_samples": int(len(s)),
           "anomalous": int(y.sum()), "errors": [{"key": k, "error": e} for k, e in errors], "metrics": metrics,
           "config": dataclasses.asdict(cfg)}
    root = os.path.abspath(os.path.expanduser(cfg.out))
    os.makedirs(root, exist_ok=True)
    write_plots(os.path.join(root, "plots"), "", cfg.name, {cfg.name: Scored(s, y, keys, scorer.threshold)},
                {cfg.name: metrics}, lambda want: shard_images(info, want), {}, cfg.gallery_k)
    storage.write_bytes_atomic(os.path.join(root, "results.json"), json.dumps(res, indent=1, default=float).encode())
    storage.write_bytes_atomic(os.path.join(root, "results.md"), markdown(res, cfg).encode())
    return res
