"""What a person sees on the console: our lines and progress bars by default, Ray's own log
lines only with ``--verbose`` (``MSC_VERBOSE=1``)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

VERBOSE_ENV = "MSC_VERBOSE"

# Lines of Ray's C++ core worker that the driver prints straight to its stderr and that a user
# cannot act on. "... has constructor arguments in the object store and max_restarts > 0": Ray
# Data hands every actor of an actor pool its own ray.put() of the map function and of its
# DataContext (ray/data/_internal/execution/operators/map_operator.py), not our arguments (a
# checkpoint path), and needs max_restarts for the killed-actor recovery; the driver holds those
# references while the dataset runs, so the restart the line warns about does not fail here.
NATIVE_NOISE = (b"constructor arguments in the object store and max_restarts > 0",)
_stderr_filter: threading.Thread | None = None


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


def filter_native_stderr(patterns: tuple[bytes, ...] = NATIVE_NOISE) -> None:
    """Drop the lines of this process's stderr, at the file descriptor (where Ray's C++ logger
    writes), that hold one of ``patterns``; everything else passes on at once (a partial line
    too, unless it may be the start of a C++ log line, ``[date ...``). Once per process."""
    global _stderr_filter
    if _stderr_filter is not None:
        return
    sys.stderr.flush()
    r, w = os.pipe()
    real = os.dup(2)
    os.dup2(w, 2)
    os.close(w)

    def write(data: bytes) -> None:
        while data:
            data = data[os.write(real, data):]

    def pump() -> None:
        held = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, held = (held + chunk).split(b"\n")
            out = b"".join(ln + b"\n" for ln in lines if not any(p in ln for p in patterns))
            if held and not held.startswith(b"["):
                out, held = out + held, b""
            write(out)
        write(held)

    _stderr_filter = threading.Thread(target=pump, name="msc-stderr-filter", daemon=True)
    _stderr_filter.start()

    def restore() -> None:  # at exit: fd 2 back to the terminal, and what the pump holds is written
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)
        _stderr_filter.join(1.0)

    import atexit

    atexit.register(restore)


def init_ray(address: str | None = None) -> None:
    """Join or start Ray as ``ray_env.init_ray`` does, with the workers' log lines on the console
    only when verbose (``log_to_driver``), Ray's C++ noise (``NATIVE_NOISE``) filtered out of the
    driver's stderr unless verbose, and Ray Data's per-operator progress bars off."""
    import ray

    from msc_dist import ray_env

    on = verbose()
    if not on and not ray.is_initialized():
        filter_native_stderr()
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
