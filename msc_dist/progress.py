"""Progress bars for long steps: one line each, with the rate and the ETA (tqdm, on stderr).

On a terminal the bar redraws in place; elsewhere (CI logs, files) it writes rarely, so a log
keeps a few lines per step rather than hundreds. ``MSC_PROGRESS=0`` turns every bar off."""

from __future__ import annotations

import os
import sys


def enabled() -> bool:
    return os.environ.get("MSC_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


def bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
        leave: bool = True, disable: bool | None = None):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.2 if tty else 30.0, disable=(not enabled()) if disable is None else disable,
                smoothing=0.1)
