"""Progress bars for long steps: one line each, with the rate and the ETA (tqdm, on stderr).

On a terminal the bar redraws in place; elsewhere (CI logs, files) it writes rarely, so a log
keeps a few lines per step rather than hundreds. ``MSC_PROGRESS=0`` turns every bar off."""

from __future__ import annotations

import os
import sys


def enabled() -> bool:
    return os.environ.get("MSC_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


class _NoBar:
    """Stands in for tqdm where it is not installed (a bare GPU machine running the benchmarks)."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file=None) -> None:
        print(s, file=file or sys.stdout, flush=True)


def bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
        leave: bool = True, disable: bool | None = None):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - a declared dependency
        return _NoBar(iterable)

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.2 if tty else 30.0, disable=(not enabled()) if disable is None else disable,
                smoothing=0.1)
