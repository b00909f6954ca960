"""``msc test``: the evaluation metrics, tables and plots of an existing checkpoint + index on
labelled shards, without training. In this process (no Ray), through the same ``Scorer`` as
serving and offline scoring, so the scores are the ones the endpoint gives.

With masks (shards carrying ``KEY.mask.png``) and an index version with a patch bank, the
Scorer's anomaly maps are measured against the masks too: ``image_roc_auc`` (of the map's
maximum, ``patch_score``), ``pixel_roc_auc`` and ``pro`` join ``roc_auc`` (of the version's own
score, as before). Each mask goes through the image's own Preprocess geometry, nearest-neighbour,
onto the S x S map (``msc_dist.data.masks``); a normal image without a mask is all normal; a mask
that does not decode, whose size is not its image's, that has no image, or an anomalous image
without a mask, is a counted, logged skip (``mask_skips`` in results.json), never a wrong metric."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from msc_dist import storage
from msc_dist.config import ConfigError
from msc_dist.data.masks import MaskSkip, MaskSkips, sample_mask
from msc_dist.data.shards import DataError, describe, iter_samples
from msc_dist.evaluate.config import TestConfig
from msc_dist.evaluate.report import Scored, shard_images, shard_masks, write_plots
from msc_dist.metrics import pixel_roc_auc, pro, summary
from msc_dist.data.labels import resolve_labels
from msc_dist.progress import bar
from msc_dist.scorer import open_scorer
from msc_dist.scoring import roc_auc

log = logging.getLogger("msc_dist.evaluate")
TABLE_KEYS = ("roc_auc", "average_precision", "fpr_at_95_tpr", "threshold", "f1_at_threshold", "fpr_at_threshold",
              "f1_max_threshold", "f1_max")
PIXEL_KEYS = ("image_roc_auc", "pixel_roc_auc", "pro")  # with masks and a patch bank


def normal_labels(names: list[str], classes: list[str] | None) -> list[int]:
    return resolve_labels(names, classes)


@dataclass
class TestScores:
    """What ``score_shards`` gathers: per scored sample its key, score and label (-1: none); the
    samples that did not score; with maps, each one's patch score and, where its mask is usable,
    its (S, S) map and mask, and the masks left out by kind."""

    __test__ = False  # not a pytest class

    keys: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    patch_scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    skips: MaskSkips = field(default_factory=MaskSkips)


def score_shards(scorer, data: str, batch_size: int, normal: list[int] | None = None) -> TestScores:
    """Every sample in ``data`` through ``scorer.score_bytes``. ``normal``: also ask for the maps
    and pair each with its sample's mask (``sample_mask``; anomalous = label not in ``normal``)."""
    info = describe(data)
    maps = normal is not None
    out = TestScores()
    pending: list = []

    def flush() -> None:
        for smp, r in zip(pending, scorer.score_bytes([s.data for s in pending], maps=maps)):
            if r.error:
                out.errors.append((smp.key, r.error))
                if maps and smp.data is None and smp.has_mask:
                    out.skips.add(smp.key, MaskSkip("orphan", "mask without an image"))
                continue
            out.keys.append(smp.key)
            out.scores.append(r.score)
            out.labels.append(-1 if smp.label is None else smp.label)
            if maps:
                out.patch_scores.append(r.patch_score)
                try:
                    mask = sample_mask(smp, scorer.preprocess, smp.label not in normal, scorer.max_pixels)
                except MaskSkip as e:
                    out.skips.add(smp.key, e)
                    continue
                out.maps.append(r.map)
                out.masks.append(mask)
        pending.clear()

    with bar(total=info.count, desc="test", unit="img") as pb:
        for sh in info.shards:
            try:
                for smp in iter_samples(sh.url, masks=maps):
                    pending.append(smp)
                    if len(pending) == batch_size:
                        pb.update(len(pending))
                        flush()
            except storage.NotRegularFile as e:  # a FIFO, device or symlink loop: an error, never a hang
                out.errors.append((sh.url, f"cannot read shard: {e.strerror}"))
        pb.update(len(pending))
        flush()
    return out


def pixel_metrics(ts: TestScores, y: np.ndarray) -> dict:
    """image_roc_auc (of the maps' maxima, over every scored image), pixel_roc_auc and pro (over
    the images with a usable mask); nan where the images with masks hold no defect pixel."""
    out = {"image_roc_auc": roc_auc(np.asarray(ts.patch_scores, np.float64), y)}
    if ts.masks:
        out.update(pixel_roc_auc=pixel_roc_auc(ts.maps, ts.masks), pro=pro(ts.maps, ts.masks, 0.3))
    return out


def overlays_of(scorer, info, want: set[str]) -> dict[str, np.ndarray]:
    """(S, S, 3) uint8 overlays (the preprocessed image with its map, ``maps.overlay``) of the
    samples ``want``, for the gallery."""
    from msc_dist.maps import overlay

    images = shard_images(info, want)
    keys = sorted(images)
    out = {}
    for k, r in zip(keys, scorer.score_bytes([images[k] for k in keys], maps=True)):
        if r.map is not None and scorer.map_threshold:
            out[k] = overlay(scorer.decode(images[k]), r.map, scorer.map_threshold)
    return out


def markdown(res: dict, cfg: TestConfig) -> str:
    m = res["metrics"]
    lines = [f"# Test: {cfg.name} on {cfg.data}", "",
             f"checkpoint `{res['checkpoint']}`, index `{cfg.index}` ({res['index_size']} vectors), "
             f"{res['test_samples']} test samples ({res['anomalous']} anomalous), {len(res['errors'])} errors", "",
             "| metric | " + cfg.name + " |", "|---|---|"]
    for k in TABLE_KEYS + tuple(k for k in PIXEL_KEYS if k in m):
        v = m.get(k)
        lines.append(f"| {k} | {'-' if v is None else f'{v:.4f}'} |")
    lines += ["", "threshold: calibrated on held-out normals by the embedding job; f1_max_threshold: the "
              "F1-optimal one on this test set (optimistic: chosen with the test labels)."]
    if "pixel_samples" in res:
        skips = ", ".join(f"{n} {k}" for k, n in res["mask_skips"].items() if n) or "none"
        lines += [f"image_roc_auc: of the anomaly map's maximum; pixel_roc_auc and pro (per-region overlap up to "
                  f"30 % FPR, normalised) over the {res['pixel_samples']} images with a usable mask; masks "
                  f"skipped: {skips}."]
    lines.append("")
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
    masks = bool(info.mask_count)
    pixel = masks and scorer.patch_spec is not None
    if masks and not pixel:
        log.info("%s carries masks but index version %s has no patch bank: no pixel metrics (build one with "
                 "python -m msc_dist.embed --score-mode patch, or --patch-bank)", cfg.data, scorer.version)
    ts = score_shards(scorer, cfg.data, cfg.batch_size, normal if pixel else None)
    keys, s, lab = ts.keys, np.asarray(ts.scores, np.float64), np.asarray(ts.labels, np.int64)
    y = ~np.isin(lab, normal)
    metrics = summary(s, y, scorer.threshold)
    res = {"name": cfg.name, "checkpoint": scorer.checkpoint, "model_id": scorer.model_id, "index": cfg.index,
           "index_size": scorer.index.count, "data": cfg.data, "normal_labels": normal, "test_samples": int(len(s)),
           "anomalous": int(y.sum()), "errors": [{"key": k, "error": e} for k, e in ts.errors], "metrics": metrics,
           "config": dataclasses.asdict(cfg)}
    if pixel:
        metrics.update(pixel_metrics(ts, y))
        res.update(score_mode=scorer.score_mode, map_threshold=scorer.map_threshold, pixel_samples=len(ts.masks),
                   mask_skips=dict(ts.skips.counts))
        if ts.skips.total:
            log.warning("%d mask(s) skipped: %s", ts.skips.total,
                        ", ".join(f"{n} {k}" for k, n in ts.skips.counts.items() if n))
    root = os.path.abspath(os.path.expanduser(cfg.out))
    os.makedirs(root, exist_ok=True)
    write_plots(os.path.join(root, "plots"), "", cfg.name, {cfg.name: Scored(s, y, keys, scorer.threshold)},
                {cfg.name: metrics}, lambda want: shard_images(info, want), {}, cfg.gallery_k,
                masks=(lambda want: shard_masks(info, want)) if masks else None,
                overlays=(lambda want: overlays_of(scorer, info, want)) if pixel else None)
    storage.write_bytes_atomic(os.path.join(root, "results.json"), json.dumps(res, indent=1, default=float).encode())
    storage.write_bytes_atomic(os.path.join(root, "results.md"), markdown(res, cfg).encode())
    return res
