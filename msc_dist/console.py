"""What a person sees on the console: our lines and progress bars by default, Ray's own log
lines only with ``--verbose`` (``MSC_VERBOSE=1``)."""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "MSC_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Also travels to Ray workers started later (storage.forwarded_env does not carry it: the
    runtime env of ``init_ray`` below does)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def setup_logging(on: bool | None = None) -> None:
    """Our loggers (msc_dist.*) at INFO, one line per event; other libraries' at WARNING and
    Ray's at ERROR unless verbose (then everything at INFO, with logger names)."""
    on = verbose() if on is None else on
    logging.basicConfig(level=logging.INFO if on else logging.WARNING,
                        format="%(message)s" if not on else "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("msc_dist").setLevel(logging.INFO)
    if not on:
        for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "filelock", "faiss"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Third-party deprecation chatter is for developers (tests turn warnings into failures
        # where they matter); a user of the CLI cannot act on it.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def init_ray(address: str | None = None) -> None:
    """Join or start Ray as ``ray_env.init_ray`` does, with the workers' log lines on the console
    only when verbose (``log_to_driver``), and Ray Data's per-operator progress bars off."""
    from msc_dist import ray_env

    on = verbose()
    ray_env.init_ray(address, log_to_driver=on, logging_level=logging.INFO if on else logging.ERROR,
                     extra_env={VERBOSE_ENV: "1" if on else "0"})
    if not on:
        try:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
        except ImportError:  # pragma: no cover - ray[data] is a dependency
            return
        # Ray Data configures its own logger at import (console handler at INFO): keep its file
        # log (the session's ray-data.log) and quiet its console handler.
        for h in logging.getLogger("ray.data").handlers:
            if "File" not in type(h).__name__:
                h.setLevel(logging.ERROR)
