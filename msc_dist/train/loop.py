"""The per-worker training loop. It knows nothing of Ray (``train.job.ray_train_fn`` is the Ray
Train entry point): ``run_worker`` takes a ``report`` callable and an optional checkpoint to
resume from, so Ray Train, the benchmark and tests drive the same code. It is ``center_pass``
(epoch 0: the global center and the frozen-feature baseline) and then ``train_one_epoch`` per
epoch. Every rank makes the same collectives and reports the same number of times."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from msc_dist import dist
from msc_dist.augment import TwoViewAugment
from msc_dist.backbones import FeatureModel, build_model
from msc_dist.card import preprocess_of
from msc_dist.data.device_decode import materialize
from msc_dist.data.loader import LabelFilter, ShardStream, make_loader
from msc_dist.data.plan import steps_per_epoch
from msc_dist.features import Embedded, autocast, embed_batches, place
from msc_dist.loss import feature_stats, mean_shift, msc_loss, summarize_feature_stats
from msc_dist.scoring import knn_score, roc_auc
from msc_dist import checkpoint as ckpt
from msc_dist.train.center import global_center
from msc_dist.train.config import ON_COLLAPSE, TrainConfig
from msc_dist.train.schedule import lr_factor

log = logging.getLogger("msc_dist.train")

Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint folder or None)
# (phase, done, total): phase "center" counts this rank's samples embedded for the center,
# "epoch N" this rank's optimiser steps in epoch N. Called often; throttle on the far side.
Progress = Callable[[str, int, int], None]


@dataclass
class DataPlan:
    """What the driver worked out before any worker started (one scan of the data)."""

    train_counts: list[tuple[str, int]]  # (shard url, normal samples)
    normal_labels: list[int]
    eval_counts: list[tuple[str, int]] | None = None  # (shard url, all samples)

    @property
    def n_train(self) -> int:
        return sum(n for _, n in self.train_counts)


def decode_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """auto: loader workers hand encoded bytes and JPEGs decode on the GPU; PIL in the workers on CPU."""
    if cfg.decode_on_device not in ("auto", "on", "off"):
        raise ValueError(f"decode_on_device must be one of ['auto', 'on', 'off'], got {cfg.decode_on_device!r}")
    return cfg.decode_on_device == "on" or (cfg.decode_on_device == "auto" and device.type == "cuda")


def loader_view(cfg: TrainConfig, train: bool) -> tuple[int, str]:
    """(side, resize mode) of the loader's square images. Training images: ``view_source_scale``
    x ``image_size``, squashed (the views are random crops of the whole image, resized down to
    ``image_size`` on the device by TwoViewAugment: as sharp as the paper's crops of the full-size
    image). Every image that is embedded (center, bank, evaluation): the run's model card, the
    ``Preprocess`` its checkpoints will carry (``card.preprocess_of`` of this config)."""
    if train:
        return max(cfg.image_size, int(round(cfg.image_size * cfg.view_source_scale))), "squash"
    pre = preprocess_of(dataclasses.asdict(cfg))
    return pre.image_size, pre.resize_mode


def _stream(cfg: TrainConfig, counts, keep: LabelFilter, *, train: bool, epoch: int = 0,
            encoded: bool = False) -> ShardStream:
    size, mode = loader_view(cfg, train)
    return ShardStream(
        counts, keep, size, cfg.batch_size, dist.world_size(), dist.rank(),
        train=train, seed=cfg.seed, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer, max_pixels=cfg.max_pixels,
        encoded=encoded, resize_mode=mode,
    )


def device_batches(cfg: TrainConfig, loader, device: torch.device, size: int, resize_mode: str):
    """Loader batches with ``images`` on the device: decoded there from bytes (``materialize``, to
    ``size`` by ``resize_mode``) when the loader hands bytes, else copied (pinned, non-blocking)."""
    for batch in loader:
        if "encoded" in batch:
            yield materialize(batch, size, device, cfg.max_pixels, resize_mode=resize_mode)
        else:
            yield {**batch, "images": batch["images"].to(device, non_blocking=True)}


def loader_for(cfg: TrainConfig, counts, keep: LabelFilter, device: torch.device, *, train: bool, epoch: int = 0):
    on = decode_on_device(cfg, device)
    # A GPU is fed by worker processes; on a CPU the forward shares the cores with the decoders,
    # and threads of this process decode without copying each batch between processes.
    loader = make_loader(_stream(cfg, counts, keep, train=train, epoch=epoch, encoded=on), cfg.loader_workers,
                         device.type == "cuda" and not on, threads=device.type == "cpu")
    return device_batches(cfg, loader, device, *loader_view(cfg, train))


def embed_counts(cfg, model, counts, keep, device, on_samples: Callable[[int], None] | None = None) -> Embedded:
    """This rank's share of (shard url, count) shards, the samples `keep` admits, as features.
    ``on_samples(n)`` after each batch: the samples read so far (decoded or skipped)."""
    loader = loader_for(cfg, counts, keep, device, train=False)
    if on_samples is not None:
        loader = _counted(loader, on_samples)
    return embed_batches(model, loader, device)


def _counted(loader, on_samples: Callable[[int], None]):
    n = 0
    for batch in loader:
        yield batch
        n += len(batch["keys"]) + len(batch["corrupt"])
        on_samples(n)


def _count_corrupt(keys: list[str] | set[str]) -> int:
    return int(dist.all_reduce_sum(torch.tensor([len(set(keys))], dtype=torch.float64)).item())


def embed_normals(cfg: TrainConfig, model: FeatureModel, plan: DataPlan, device) -> Embedded:
    """This rank's share of the normal training images, unaugmented, through the model in eval
    mode: the kNN bank of the evaluation and the collapse alarm's ``normal_cos``."""
    model.eval()
    return embed_counts(cfg, model, plan.train_counts, LabelFilter(frozenset(plan.normal_labels)), device)


def normal_cos(emb: Embedded, center: torch.Tensor) -> float:
    """The mean pairwise cosine of the normal features over every rank (the same on every rank)."""
    stats = dist.all_reduce_sum(feature_stats(emb.z, center.detach().cpu()))
    return summarize_feature_stats(stats)["feature_cos"]


def evaluate(cfg: TrainConfig, model: FeatureModel, plan: DataPlan, device, train_emb: Embedded | None = None) -> dict:
    """kNN (k = cfg.knn_k) ROC-AUC of the eval set against the normal training features.
    Every rank embeds its share; features are gathered; rank 0 scores."""
    if plan.eval_counts is None:
        return {}
    if train_emb is None:
        train_emb = embed_normals(cfg, model, plan, device)
    model.eval()
    ev = embed_counts(cfg, model, plan.eval_counts, LabelFilter(None), device)
    bank = dist.gather_varlen(train_emb.z)
    q = dist.gather_varlen(ev.z)
    labels = dist.gather_varlen(ev.labels)
    corrupt = _count_corrupt(ev.corrupt)
    if not dist.is_main_process():
        return {}
    is_anom = ~np.isin(labels.numpy(), plan.normal_labels)
    scores = knn_score(q, bank, k=cfg.knn_k).numpy()
    return {
        "roc_auc": roc_auc(scores, is_anom),
        "eval_samples": int(q.shape[0]),
        "eval_corrupt": corrupt,
        "score_normal_mean": float(scores[~is_anom].mean()) if (~is_anom).any() else float("nan"),
        "score_anomaly_mean": float(scores[is_anom].mean()) if is_anom.any() else float("nan"),
    }


def _per_rank(n: int) -> list[int]:
    """Each rank's own count, gathered so rank 0 can report all of them."""
    return [int(v) for v in dist.gather_varlen(torch.tensor([n], dtype=torch.long)).tolist()]


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
        return True
    except ValueError:
        return False


def _save(d: str, metrics: dict, model: FeatureModel, center, cfg, opt) -> None:
    ckpt.save(d, model.state_dict(), center, dataclasses.asdict(cfg), dict(metrics), opt.state_dict())


def _publish(report: Report, metrics: dict, model: FeatureModel, center, cfg, opt) -> None:
    """Rank 0 writes the checkpoint folder; every rank calls report once."""
    _log_epoch(metrics)
    if dist.is_main_process():
        with tempfile.TemporaryDirectory(prefix="msc-ckpt-") as d:
            _save(d, metrics, model, center, cfg, opt)
            report(metrics, d)
    else:
        report(metrics, None)


# (local checkpoint folder, the epoch's metrics) -> where it was kept (a folder or s3:// URL)
KeepApart = Callable[[str, dict], str]


def _keep_apart(report: Report, keep_apart: KeepApart | None, metrics: dict, model: FeatureModel, center, cfg,
                opt, last_good: int) -> None:
    """An epoch the collapse alarm stopped: reported without a checkpoint, so that the run's
    registered checkpoint stays the last good epoch's; rank 0 writes its checkpoint through
    ``keep_apart`` (none without one). Every rank calls report once."""
    metrics.update(stopped=True, checkpoint_epoch=last_good)
    if dist.is_main_process() and keep_apart is not None:
        with tempfile.TemporaryDirectory(prefix="msc-ckpt-") as d:
            _save(d, metrics, model, center, cfg, opt)
            metrics["collapsed_checkpoint"] = keep_apart(d, metrics)
    _log_epoch(metrics)
    report(metrics, None)


def format_epoch(m: dict) -> str:
    """The one line a person reads per epoch."""
    parts = [f"epoch {m['epoch']}"]
    four = ("loss", "roc_auc", "feature_cos", "normal_cos")
    for k in ("loss", "roc_auc", "feature_cos", "normal_cos", "images_per_s", "epoch_seconds", "center_seconds",
              "corrupt_skipped"):
        if k in m and m[k] is not None and not (k == "normal_cos" and m["epoch"] == 0):  # = feature_cos there
            v = m[k]
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) and k in four
                         else f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}")
    if m.get("collapsed"):
        parts.append(f"COLLAPSED: {m.get('collapse_reason', 'feature_cos >= collapse_cos')}")
    if m.get("stopped"):
        kept = f"; its checkpoint kept apart in {m['collapsed_checkpoint']}" if m.get("collapsed_checkpoint") else ""
        parts.append(f"stopped (on_collapse stop){kept}; the run's checkpoint stays epoch {m['checkpoint_epoch']}")
    return " | ".join(parts)


def _log_epoch(m: dict) -> None:
    # The driver prints the epoch line (train.job); workers keep it in their own log.
    if dist.is_main_process():
        log.debug("%s", format_epoch(m))


def full_batches(loader, batch_size: int, n_steps: int, corrupt: set[str]):
    """Exactly ``n_steps`` full (B, 3, S, S) uint8 batches (where ``loader`` put them: on the
    device from ``loader_for``); records skipped corrupt keys."""
    it, done = iter(loader), 0
    while done < n_steps:
        try:
            batch = next(it)
        except StopIteration:
            raise RuntimeError(
                f"rank {dist.rank()}: data ran out after {done}/{n_steps} steps (too many corrupt samples?)"
            ) from None
        corrupt.update(batch["corrupt"])
        if batch["images"].shape[0] == batch_size:
            done += 1
            yield batch["images"]


class Stepper:
    """One optimiser step: two augmented views on the device, one forward for both, MSC loss."""

    def __init__(self, cfg: TrainConfig, model: FeatureModel, opt, center: torch.Tensor, device: torch.device):
        self.cfg, self.opt, self.center, self.device = cfg, opt, center, device
        self.augment = TwoViewAugment(cfg.image_size, cfg.crop_min_scale, cfg.hflip).to(device)
        net = model
        if cfg.compile:
            net = torch.compile(net)
        self.net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_dist() else net
        self.global_negatives = cfg.global_negatives and dist.world_size() > 1
        # Summed feature_stats of the first view of every step since reset_stats (stays on the device).
        self.stats = torch.zeros(4, dtype=torch.float64, device=device)

    def reset_stats(self) -> None:
        self.stats.zero_()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S', S') uint8 on the device (S' from ``loader_view``) -> detached float64 loss."""
        cfg, c, b = self.cfg, self.center, x.shape[0]
        views = self.augment(x).contiguous(memory_format=torch.channels_last)  # (2B, 3, S, S) in [0, 1]
        with autocast(self.device):
            z = self.net(views)  # (2B, D) float32 unit vectors
        z1, z2 = z[:b], z[b:]
        if self.global_negatives:
            k1 = dist.all_gather_with_grad(mean_shift(z1, c)[1])  # (W*B, D)
            k2 = dist.all_gather_with_grad(mean_shift(z2, c)[1])
            loss = msc_loss(z1, z2, c, cfg.temperature, cfg.angular_weight, global_keys=(k1, k2), offset=dist.rank() * b)
        else:
            loss = msc_loss(z1, z2, c, cfg.temperature, cfg.angular_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.stats += feature_stats(z1, c)
        return loss.detach().double()


def center_pass(cfg: TrainConfig, model: FeatureModel, plan: DataPlan, device: torch.device,
                node_id: str = "local", progress: Progress | None = None) -> tuple[torch.Tensor, dict]:
    """Epoch 0: every rank embeds its exact share of the normal set with the frozen model; the
    global center from those features, and the frozen-feature (kNN baseline) evaluation reusing
    them. Returns (center on the device, epoch-0 metrics)."""
    t0 = time.perf_counter()
    model.eval()
    share = plan.n_train // dist.world_size()  # this rank's slice, +-1
    emb = embed_counts(cfg, model, plan.train_counts, LabelFilter(frozenset(plan.normal_labels)), device,
                       on_samples=None if progress is None else (lambda n: progress("center", n, share)))
    center_cpu, n = global_center(emb.z)
    stats = summarize_feature_stats(dist.all_reduce_sum(feature_stats(emb.z, center_cpu)))  # the frozen features' spread
    metrics = {"epoch": 0, "step": 0, "start_epoch": 0, "center_samples": n,
               "corrupt_skipped": _count_corrupt(emb.corrupt), "center_seconds": time.perf_counter() - t0,
               **stats, "normal_cos": stats["feature_cos"], "normal_cos_start": stats["feature_cos"],
               "rank_center_samples": _per_rank(emb.z.shape[0]),
               # which node each rank ran on (first 12 hex digits of the Ray node id)
               "rank_nodes": [f"{v:012x}" for v in _per_rank(int(node_id[:12], 16) if _is_hex(node_id[:12]) else 0)]}
    if dist.is_main_process() and emb.corrupt:
        log.warning("rank %d skipped %d corrupt samples: %s", dist.rank(), len(emb.corrupt), sorted(set(emb.corrupt)))
    metrics.update(evaluate(cfg, model, plan, device, train_emb=emb))
    return center_cpu.to(device), metrics


def train_one_epoch(cfg: TrainConfig, model: FeatureModel, stepper: "Stepper", plan: DataPlan, epoch: int,
                    n_steps: int, device: torch.device, progress: Progress | None = None) -> dict:
    """One pass of ``n_steps`` optimiser steps on every rank; the epoch's metrics (no evaluation,
    no step count: the caller adds ``step``/``start_epoch``). The learning rate follows
    ``cfg.lr_schedule`` by global step, so a resumed run continues the same curve."""
    model.train()  # BatchNorm stays in eval mode (FeatureModel.train)
    # This epoch's augmentations and loader-worker seeds depend on (seed, rank, epoch) alone, not
    # on what ran before: evaluation passes draw from the global RNG (each DataLoader takes a
    # base seed), and a run resumed from a checkpoint must train as the uninterrupted one did.
    torch.manual_seed((cfg.seed * 1000 + dist.rank()) * 1009 + epoch)
    normal = LabelFilter(frozenset(plan.normal_labels))
    loader = loader_for(cfg, plan.train_counts, normal, device, train=True, epoch=epoch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    stepper.reset_stats()
    corrupt: set[str] = set()
    done, t0 = 0, time.perf_counter()
    lr = cfg.lr
    first, total, warmup = (epoch - 1) * n_steps, cfg.epochs * n_steps, round(cfg.warmup_epochs * n_steps)
    for x in full_batches(loader, cfg.batch_size, n_steps, corrupt):
        lr = cfg.lr * lr_factor(first + done, total, warmup, cfg.lr_schedule)
        stepper.set_lr(lr)
        loss_sum += stepper(x)
        done += 1
        if progress is not None:
            progress(f"epoch {epoch}", done, n_steps)
    del loader
    sums = dist.all_reduce_sum(torch.cat([loss_sum.reshape(1), stepper.stats]).cpu())  # one collective
    mean_loss = float(sums[0].item()) / max(1, n_steps * dist.world_size())
    elapsed = time.perf_counter() - t0
    if corrupt:
        log.warning("rank %d skipped corrupt samples this epoch: %s", dist.rank(), sorted(corrupt))
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} at epoch {epoch}")
    return {"epoch": epoch, "loss": mean_loss, "lr": lr, **summarize_feature_stats(sums[1:]),
            "steps": n_steps, "rank_steps": _per_rank(done),
            "images_per_s": n_steps * cfg.batch_size * dist.world_size() / max(elapsed, 1e-9),
            "corrupt_skipped": _count_corrupt(corrupt), "epoch_seconds": elapsed}


def run_worker(cfg: TrainConfig, plan: DataPlan, report: Report, resume: ckpt.LoadedCheckpoint | None,
               device: torch.device, node_id: str = "local", progress: Progress | None = None,
               keep_apart: KeepApart | None = None) -> None:
    """Epoch 0 (center pass), then cfg.epochs training epochs; each epoch's metrics and checkpoint
    go to ``report``. An epoch the collapse alarm stops (``on_collapse: stop``) is reported without
    a checkpoint (its checkpoint goes to ``keep_apart``) and ends the run."""
    torch.manual_seed(cfg.seed * 1000 + dist.rank())
    model = place(build_model(cfg.backbone, cfg.weights), device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)

    start_epoch, step = 0, 0
    if resume is not None:
        c = resume
        model.load_state_dict(c.model_state)
        if c.optimizer_state is not None:
            opt.load_state_dict(c.optimizer_state)
        center, start_epoch, step = c.center.to(device), int(c.meta["epoch"]), int(c.meta.get("step", 0))
        start_cos = c.meta.get("normal_cos_start")  # None in checkpoints from before the relative alarm
        if start_cos is None and cfg.collapse_rise > 0 and dist.is_main_process():
            log.warning("the checkpoint records no epoch-0 normal_cos: the collapse_rise alarm is off for this run")
        if dist.is_main_process():
            log.info("resumed from checkpoint at epoch %d (step %d)%s", start_epoch, step,
                     "; the run is already complete" if start_epoch >= cfg.epochs else "")
    else:
        center, metrics = center_pass(cfg, model, plan, device, node_id, progress)
        start_cos = metrics["normal_cos_start"]
        _publish(report, metrics, model, center, cfg, opt)
    last_good = start_epoch

    stepper = Stepper(cfg, model, opt, center, device)
    n_steps = steps_per_epoch(plan.n_train, dist.world_size(), cfg.batch_size)
    if cfg.steps_per_epoch:
        n_steps = min(n_steps, cfg.steps_per_epoch)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        metrics = train_one_epoch(cfg, model, stepper, plan, epoch, n_steps, device, progress)
        step += n_steps
        metrics = {"epoch": epoch, "step": step, "start_epoch": start_epoch, **metrics}
        eval_due = plan.eval_counts is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)
        bank = None
        if eval_due or cfg.collapse_rise > 0:  # the evaluation's kNN bank is the same pass
            bank = embed_normals(cfg, model, plan, device)
            metrics.update(normal_cos=normal_cos(bank, center), normal_cos_start=start_cos)
        if eval_due:
            metrics.update(evaluate(cfg, model, plan, device, train_emb=bank))
        if collapse_check(cfg, metrics) and cfg.on_collapse == "stop":
            _keep_apart(report, keep_apart, metrics, model, center, cfg, opt, last_good)
            break
        _publish(report, metrics, model, center, cfg, opt)
        last_good = epoch


def collapse_check(cfg: TrainConfig, metrics: dict) -> bool:
    """True (with ``metrics["collapsed"]``, ``metrics["collapse_reason"]`` and a warning on rank 0)
    when the epoch's features are collapsing, from the normal images alone: the training views'
    mean pairwise cosine reached ``cfg.collapse_cos``, or the unaugmented normal features' one
    (``normal_cos``) rose by ``cfg.collapse_rise`` or more over its epoch-0 value. The metrics are
    the same on every rank, so every rank decides the same."""
    if cfg.on_collapse not in ON_COLLAPSE:
        raise ValueError(f"on_collapse must be one of {list(ON_COLLAPSE)}, got {cfg.on_collapse!r}")
    reasons = []
    cos = metrics.get("feature_cos")
    if cos is not None and cos >= cfg.collapse_cos:
        reasons.append(f"feature_cos {cos:.4f} >= collapse_cos {cfg.collapse_cos:.2f}")
    now, start = metrics.get("normal_cos"), metrics.get("normal_cos_start")
    if cfg.collapse_rise > 0 and now is not None and start is not None and now - start >= cfg.collapse_rise:
        reasons.append(f"normal_cos {now:.4f} rose {now - start:+.4f} over epoch 0's {start:.4f} "
                       f"(collapse_rise {cfg.collapse_rise:g})")
    if not reasons:
        return False
    metrics.update(collapsed=True, collapse_reason="; ".join(reasons))
    if dist.is_main_process():
        log.warning("epoch %d: the features are collapsing (%s, mean ||z - c|| %.4f)%s", metrics["epoch"],
                    metrics["collapse_reason"], metrics.get("zc_norm", float("nan")),
                    "; stopping (on_collapse: stop)" if cfg.on_collapse == "stop" else
                    "; lower --lr or set --on-collapse stop")
    return True
