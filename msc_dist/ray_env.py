"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import os

from msc_dist import storage


def init_ray(address: str | None = None) -> None:
    """RAY_ADDRESS (set by ``ray job submit``) or ``address`` joins a cluster; otherwise a local
    Ray starts in-process. Storage credentials and endpoint travel to every worker."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None,
             runtime_env={"env_vars": storage.forwarded_env()}, log_to_driver=True)
