"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import logging
import os
import socket

from msc_dist import storage

log = logging.getLogger("msc_dist.ray")

# Set by `ray job submit` for the driver: the job's runtime env, which already reaches every
# worker. A second runtime env from ray.init would conflict with it for any variable in both.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CONNECT_TIMEOUT_S = 10.0


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for ``auto`` / ``local``."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not after Ray's minutes of GCS retries, when nothing listens at ``address``."""
    hp = host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(
            f"no Ray cluster answers at {address!r} ({e}): start one (`ray start --head`), correct --ray-address / "
            "RAY_ADDRESS, or leave both unset to start a local Ray in-process") from None


def runtime_env(extra: dict[str, str] | None = None) -> dict | None:
    """The storage endpoint (and ``extra``) for the workers of a cluster joined directly; nothing
    for a submitted job (its runtime env already applies) and never credentials."""
    if os.environ.get(JOB_CONFIG_ENV):
        return None
    env = {**storage.forwarded_env(), **(extra or {})}
    return {"env_vars": env} if env else None


def init_ray(address: str | None = None, *, log_to_driver: bool = True, logging_level: int = logging.INFO,
             extra_env: dict[str, str] | None = None) -> None:
    """``address`` or RAY_ADDRESS (set by ``ray job submit``) joins that cluster, after checking
    that it answers; with neither, a new local Ray starts in-process. (A bare ``ray.init()``
    would instead join whatever cluster Ray's "current cluster" file names, even a dead one.)"""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        log.info("starting a local Ray in-process")
        # workers inherit this process's environment
        ray.init(address="local", log_to_driver=log_to_driver, logging_level=logging_level)
        return
    check_reachable(address)
    ray.init(address=address, runtime_env=runtime_env(extra_env), log_to_driver=log_to_driver,
             logging_level=logging_level)
