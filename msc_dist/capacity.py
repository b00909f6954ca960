"""Refuse a Ray plan that can never be scheduled, instead of waiting on it forever."""

from __future__ import annotations

import logging
import os

from msc_dist.config import ConfigError

log = logging.getLogger(__name__)


def check_capacity(what: str, cpus_per_actor: float, gpus_per_actor: float, min_actors: int,
                   ray_address: str | None = None) -> None:
    """Actors need ``cpus_per_actor`` (and GPUs) each, and the read tasks at least one CPU
    beside them. On a local Ray (no address: nothing can add nodes) a shortfall is an error; on
    a cluster it is a warning, since an autoscaler may add the nodes."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    problems = []
    need = cpus_per_actor * min_actors + 1
    if need > cpus:
        problems.append(f"{min_actors} actor(s) x {cpus_per_actor:g} CPU (--cpus-per-actor) + 1 CPU for the read tasks "
                        f"= {need:g} CPUs, but the cluster has {cpus:g}")
    if gpus_per_actor and gpus_per_actor * min_actors > gpus:
        problems.append(f"{min_actors} actor(s) x {gpus_per_actor:g} GPU (--use-gpu) but the cluster has {gpus:g} GPUs")
    if not problems:
        return
    msg = f"{what}: this plan cannot be scheduled: " + "; ".join(problems) + \
        ". Lower --cpus-per-actor / --min-pool-size, drop --use-gpu, or add nodes."
    if ray_address is None and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(msg)
    log.warning("%s (waiting for an autoscaler to add nodes)", msg)


def check_memory(what: str, bytes_per_worker: int, workers: int, ray_address: str | None = None) -> None:
    """Right after connecting, before any work is scheduled: ``workers`` x ``bytes_per_worker``
    (a lower bound of what each needs) against the memory Ray may use for tasks on the cluster,
    and one worker against its largest node. A shortfall is an error on a local Ray and a
    warning on a cluster (an autoscaler may add nodes), as ``check_capacity``."""
    import ray

    total = float(ray.cluster_resources().get("memory", 0))
    largest = max((float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if not total:
        return
    gib = 2.0 ** 30
    problems = []
    if workers * bytes_per_worker > total:
        problems.append(f"{workers} worker(s) x at least {bytes_per_worker / gib:.1f} GiB = {workers * bytes_per_worker / gib:.1f} GiB, "
                        f"but the cluster has {total / gib:.1f} GiB of memory for tasks")
    elif bytes_per_worker > largest:
        problems.append(f"one worker needs at least {bytes_per_worker / gib:.1f} GiB, but the largest node has "
                        f"{largest / gib:.1f} GiB of memory for tasks")
    if not problems:
        return
    msg = (f"{what}: this plan does not fit in memory: " + "; ".join(problems) +
           ". Lower --image-size, --batch-size or --num-workers, or add nodes.")
    if ray_address is None and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(msg)
    log.warning("%s (waiting for an autoscaler to add nodes)", msg)
