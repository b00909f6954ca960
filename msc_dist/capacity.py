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
