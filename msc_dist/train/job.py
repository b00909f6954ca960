"""The driver: validate data and config, then launch the Ray Train TorchTrainer; and
``ray_train_fn``, what each Ray Train worker runs (the loop itself, ``train.loop``, knows nothing
of Ray).

Everything that can be wrong with the inputs is found here, before any worker starts. The
console gets one line per epoch and a progress bar over the epochs, printed by this driver."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from msc_dist import storage
from msc_dist.backbones import REGISTRY, get_spec
from msc_dist.data.labels import resolve_labels
from msc_dist.capacity import check_memory
from msc_dist.config import ConfigError, check_ranges, to_json
from msc_dist.data.loader import LabelFilter, kept_counts
from msc_dist.data.plan import steps_per_epoch
from msc_dist.data.shards import DataError, DatasetInfo, describe
from msc_dist.data.decode import RESIZE_MODES
from msc_dist.patches import SCORE_MODES, SOURCES
from msc_dist.console import init_ray
from msc_dist.train.config import LR_SCHEDULES, ON_COLLAPSE, TrainConfig
# Imported with the module, before Ray starts: a job's driver must not import from its working dir
# after ray.init (on a one-host test "cluster" the nodes share that folder and may re-extract it).
from msc_dist.train.progress import EpochProgress
from msc_dist.train.loop import DataPlan

log = logging.getLogger("msc_dist.train")


# With no --data the job trains on the demo set; these replace the paper-scale defaults there
# (a laptop run in minutes), unless the user set them.
DEMO_DEFAULTS = {"image_size": 96, "epochs": 3, "batch_size": 32, "lr": 1e-4}


def ensure_demo(cfg: TrainConfig, explicit: set[str] = frozenset()) -> TrainConfig:
    """No --data: generate the demo set once (reused when its manifests exist)."""
    from msc_dist.data.demo import make_demo

    root = os.path.expanduser(cfg.demo_dir)
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if not (os.path.exists(os.path.join(train, "shards.json")) and os.path.exists(os.path.join(test, "shards.json"))):
        print(f"no --data given: generating the demo set in {root}", flush=True)
        make_demo(root)
    preset = {k: v for k, v in DEMO_DEFAULTS.items() if k not in explicit}
    return dataclasses.replace(cfg, data=train, eval_data=cfg.eval_data or test, normal_classes=["normal"], **preset)


def validate(cfg: TrainConfig, explicit: set[str] = frozenset()) -> tuple[TrainConfig, DataPlan]:
    if cfg.backbone not in REGISTRY:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; valid names: {sorted(REGISTRY)}")
    get_spec(cfg.backbone)
    check_ranges(cfg)  # TrainConfig.RANGES (batch_size >= 2: the contrastive loss needs negatives)
    for key, valid in (("resize_mode", RESIZE_MODES), ("lr_schedule", LR_SCHEDULES), ("on_collapse", ON_COLLAPSE),
                       ("preset", tuple(TrainConfig.PRESETS)), ("score_mode", SCORE_MODES), ("patch_source", SOURCES)):
        if getattr(cfg, key) not in valid:
            raise ConfigError(f"unknown {key} {getattr(cfg, key)!r}; valid: {list(valid)}")
    if not 0 <= cfg.warmup_epochs <= max(cfg.epochs, 0):
        raise ConfigError(f"warmup_epochs must be in [0, epochs = {cfg.epochs}], got {cfg.warmup_epochs}")
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    if cfg.placement_strategy not in strategies:
        raise ConfigError(f"unknown placement_strategy {cfg.placement_strategy!r}; valid: {list(strategies)}")
    if cfg.weights and not storage.exists(cfg.weights):
        raise ConfigError(f"--weights {cfg.weights!r} does not exist")
    if cfg.data is None:
        cfg = ensure_demo(cfg, explicit)
    info = describe(cfg.data)
    if info.count == 0:
        raise DataError(f"data {cfg.data!r} holds no samples")
    normal = resolve_labels(cfg.normal_classes, info.classes)
    train_counts = kept_counts(info, LabelFilter(frozenset(normal)))
    n = sum(c for _, c in train_counts)
    if n == 0:
        raise DataError(
            f"data {cfg.data!r} has no normal samples: its labels are {_fmt(info)}, normal classes are "
            f"{cfg.normal_classes} (= labels {normal}); set --normal-classes"
        )
    if steps_per_epoch(n, cfg.num_workers, cfg.batch_size) == 0:
        raise DataError(
            f"{n} normal samples are fewer than num_workers x batch_size = {cfg.num_workers * cfg.batch_size}: "
            "lower --batch-size or --num-workers"
        )
    eval_counts = None
    if cfg.eval_data:
        ev = describe(cfg.eval_data)
        labels = ev.label_counts()
        if None in labels:
            raise DataError(f"eval data {cfg.eval_data!r} has {labels[None]} unlabelled samples; every eval sample needs a .cls label")
        if not any(lab in normal for lab in labels) or all(lab in normal for lab in labels):
            raise DataError(f"eval data {cfg.eval_data!r} needs both normal {normal} and anomalous samples; its labels are {_fmt(ev)}")
        eval_counts = [(s.url, s.count) for s in ev.shards]
    if cfg.tracking_uri:  # the store reachable, the experiment usable; relative local paths made absolute
        from msc_dist.tracking import check_uri

        cfg = dataclasses.replace(cfg, tracking_uri=check_uri(cfg.tracking_uri, cfg.tracking_experiment))
    return cfg, DataPlan(train_counts, normal, eval_counts)


def torch_config(cfg: TrainConfig):
    """The process group: NCCL on GPUs, gloo on CPUs; a rank that stalls (e.g. on storage) fails
    the group after ``collective_timeout_s`` instead of holding the others for 30 minutes."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if cfg.use_gpu else "gloo", timeout_s=int(cfg.collective_timeout_s))


def _fmt(info: DatasetInfo) -> dict:
    return {("unlabelled" if k is None else k): v for k, v in info.label_counts().items()}


@dataclass
class TrainOutcome:
    metrics: dict  # the last epoch's (after a collapse stop: the stopped epoch's, marked)
    checkpoint: str | None  # URL/path of the latest registered checkpoint
    run_dir: str
    error: BaseException | None


def main(cfg: TrainConfig, explicit: set[str] = frozenset()) -> TrainOutcome:
    """Validate, then train on Ray. ``explicit``: keys the user set (the demo preset leaves them)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dataclasses.replace(cfg, storage_path=cfg.storage_path if storage.is_remote(cfg.storage_path)
                              else os.path.abspath(os.path.expanduser(cfg.storage_path)),
                              demo_dir=os.path.expanduser(cfg.demo_dir))
    demo = cfg.data is None
    cfg, plan = validate(cfg, explicit)
    log.debug("resolved config:\n%s", to_json(cfg))

    run_dir = storage.join(cfg.storage_path, cfg.name)
    done = _resume_epoch(run_dir, cfg)  # a checkpoint that fails its checks is refused here, in one line

    init_ray(cfg.ray_address)
    # Right after connecting, before any work is scheduled: what the workers need against what the cluster has.
    check_memory("training job", train_bytes_per_worker(cfg), cfg.num_workers, cfg.ray_address)

    fs, path = storage.pyarrow_filesystem(cfg.storage_path)
    print(f"run {run_dir}: " + (f"resuming after epoch {done} of {cfg.epochs}" if done is not None else
                                f"{cfg.epochs} epochs on {plan.n_train} normal samples, {cfg.num_workers} workers"
                                f"{' (GPU)' if cfg.use_gpu else ''}"), flush=True)
    n_steps = steps_per_epoch(plan.n_train, cfg.num_workers, cfg.batch_size)
    if cfg.steps_per_epoch:
        n_steps = min(n_steps, cfg.steps_per_epoch)
    progress = EpochProgress(cfg.epochs, n_steps, done or 0, cfg.num_workers)
    # The resolved config beside the run (and inside every checkpoint).
    storage.write_bytes_atomic(storage.join(run_dir, "config.json"), to_json(cfg).encode())

    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan),
                           "progress_queue": progress.queue},
        torch_config=torch_config(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[progress.callback],
        ),
    )
    try:
        with progress:
            result = trainer.fit()
        err = None
    except Exception as e:  # ray.train.TrainingFailedError and friends
        result, err = None, e
    if result is None:
        raise err  # type: ignore[misc]
    if demo and result.error is None:
        # The embedded default goes one step further: the index that `serve run serving/config.yaml` serves.
        from msc_dist.embed.config import EmbedConfig
        from msc_dist.embed.job import main as embed_main

        emb = embed_main(EmbedConfig(checkpoint=run_dir, out=storage.join(run_dir, "serving"), ray_address=cfg.ray_address))
        print(f"demo index for serving: {emb.out} ({emb.manifest.count} vectors, threshold {emb.manifest.threshold:.4f})")
    ck = checkpoint_url(cfg, result.checkpoint.path) if result.checkpoint else None
    metrics = dict(result.metrics or {})  # Ray's: the latest checkpoint's report
    if progress.last and progress.last.get("epoch", -1) > metrics.get("epoch", -1):
        metrics = dict(progress.last)  # an epoch that stopped on a collapse reports no checkpoint
    if cfg.tracking_uri:
        print(f"MLflow run {metrics['mlflow_run_id']} (experiment {cfg.tracking_experiment!r}) in {cfg.tracking_uri}"
              if metrics.get("mlflow_run_id") else
              f"MLflow: the run was not logged to {cfg.tracking_uri} (the workers' log says why)")
    return TrainOutcome(metrics, ck, run_dir, result.error)


def checkpoint_url(cfg: TrainConfig, path: str) -> str:
    """A Ray Train checkpoint's path on the run storage's filesystem as a URL (s3://... on S3)."""
    if storage.is_remote(cfg.storage_path):
        return cfg.storage_path.split("://", 1)[0] + "://" + path
    return path


def train_bytes_per_worker(cfg: TrainConfig) -> int:
    """A lower bound on one worker's memory: the float32 input of its forward pass (two views of
    batch_size images, 3 x S x S each) and the uint8 images the views are cut from (decoded at
    view_source_scale x S). Activations, gradients and the model come on top."""
    side = int(cfg.view_source_scale * cfg.image_size)
    return cfg.batch_size * (2 * 3 * cfg.image_size ** 2 * 4 + 3 * side * side)


def _resume_epoch(run_dir: str, cfg: TrainConfig) -> int | None:
    """The epoch of the checkpoint the run will resume from, None for a new run. That checkpoint
    is loaded and verified here, in the driver, before Ray starts: a tampered or incomplete one,
    or one of another backbone, is a CheckpointError (one line) instead of a failing worker group."""
    from msc_dist import checkpoint as ckpt

    if not storage.exists(storage.join(run_dir, ckpt.RAY_SNAPSHOT)):
        return None
    try:
        folder = ckpt.resolve(run_dir)
    except ckpt.CheckpointError:
        return None  # a snapshot that records no checkpoint yet: the run starts over
    loaded = ckpt.load(folder, with_optimizer=True)  # every file against its sha256
    trained = loaded.config.get("backbone")
    if trained != cfg.backbone:
        raise ckpt.CheckpointError(f"cannot resume {run_dir}: its checkpoint {folder} is a {trained} model, not "
                                   f"--backbone {cfg.backbone}; pick another --name to start a new run")
    try:
        return int(loaded.meta["epoch"])
    except (KeyError, TypeError, ValueError):
        raise ckpt.CheckpointError(f"cannot resume {run_dir}: {folder}/meta.json records no epoch") from None


def ray_train_fn(loop_config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from msc_dist import checkpoint as ckpt
    from msc_dist.console import setup_logging
    from msc_dist.train.loop import run_worker

    setup_logging()
    cfg = TrainConfig(**loop_config["cfg"])
    p = loop_config["plan"]
    plan = DataPlan([tuple(x) for x in p["train_counts"]], p["normal_labels"],
                    [tuple(x) for x in p["eval_counts"]] if p["eval_counts"] is not None else None)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    run_dir = storage.join(cfg.storage_path, cfg.name)
    tracker = None
    if cfg.tracking_uri and ray.train.get_context().get_world_rank() == 0:  # rank 0 alone logs to MLflow
        from msc_dist.tracking import RunTracker, TrackingError

        try:  # the driver checked the store; one that fails now costs the tracking, not the run
            tracker = RunTracker.open(cfg.tracking_uri, cfg.tracking_experiment, run_dir, cfg.name, loop_config["cfg"])
        except TrackingError as e:
            log.warning("%s; training goes on without MLflow", e)

    def report(metrics: dict, folder: str | None) -> None:
        if tracker is not None:
            metrics = {**metrics, "mlflow_run_id": tracker.run_id}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        if tracker is not None:
            kept = ray.train.get_checkpoint() if folder else None  # after a report: the one it registered
            tracker.log_epoch(metrics, checkpoint_url(cfg, kept.path) if kept is not None else None)

    resume = None
    ck = ray.train.get_checkpoint()  # the latest reported checkpoint, after a restart or a rerun
    if ck is not None:
        with ck.as_directory() as d:
            resume = ckpt.load(d, with_optimizer=True)
    progress = None
    if loop_config.get("progress_queue") is not None and ray.train.get_context().get_world_rank() == 0:
        from msc_dist.train.progress import ProgressSender

        progress = ProgressSender(loop_config["progress_queue"])

    def keep_apart(folder: str, metrics: dict) -> str:  # a collapsed epoch's checkpoint, unregistered
        return ckpt.store(folder, ckpt.collapsed_url(run_dir, int(metrics["epoch"])))

    try:
        run_worker(cfg, plan, report, resume, device, ray.get_runtime_context().get_node_id(), progress, keep_apart)
    except BaseException as e:
        if tracker is not None:
            tracker.finish(failed=e)  # a restarted worker group opens the same run again
        raise
    if tracker is not None:
        tracker.finish()
