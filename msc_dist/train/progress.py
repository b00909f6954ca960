"""The driver's view of a training run: one line per epoch and a progress bar over the epochs
(rate and ETA), fed by a Ray Train callback on the controller through a small queue actor. The
driver prints them itself, so the console needs none of the workers' own output."""

from __future__ import annotations

import queue as _queue
import threading

import ray
import ray.train
from ray.util.queue import Empty, Queue

from msc_dist.progress import bar
from msc_dist.train.loop import format_epoch


class _ToQueue(ray.train.UserCallback):
    def __init__(self, q: Queue):
        self.q = q

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self.q.put(dict(metrics[0]))  # rank 0's metrics: the epoch's, all-reduced


class EpochProgress:
    """``with EpochProgress(epochs, done) as p: trainer.fit()`` with ``p.callback`` in the RunConfig."""

    def __init__(self, epochs: int, done: int = 0, out=print):
        self.q = Queue(actor_options={"num_cpus": 0})
        self.callback = _ToQueue(self.q)
        self.epochs, self.done, self.out = epochs, done, out
        self.last: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar = None

    def __enter__(self) -> "EpochProgress":
        # epoch 0 (center + frozen baseline) counts as one step of the bar
        first = "center pass + epoch 0" if not self.done else f"epoch {self.done + 1}"
        self._bar = bar(total=self.epochs + 1, desc=first, unit="epoch")
        if self.done:
            self._bar.update(self.done + 1)
        self._thread.start()
        return self

    def _emit(self, m: dict) -> None:
        self.last = m
        self._bar.write(format_epoch(m))
        self._bar.set_description(f"epoch {m['epoch'] + 1}" if m["epoch"] < self.epochs else "epochs", refresh=False)
        self._bar.update(1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._emit(self.q.get(timeout=0.5))
            except (Empty, _queue.Empty):
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to show
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            while True:
                self._emit(self.q.get_nowait())
        except Exception:
            pass
        self._bar.close()
        try:
            ray.kill(self.q.actor)
        except Exception:
            pass
