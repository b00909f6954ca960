"""The driver's view of a training run: one line per epoch and progress bars with rate and ETA
(the center pass over the normal samples, then the optimiser steps of all epochs), fed through a
small queue actor by a Ray Train callback on the controller (the epoch reports) and by rank 0
(its progress, throttled). The driver prints them itself, so the console needs none of the
workers' own output."""

from __future__ import annotations

import queue as _queue
import threading
import time

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


class ProgressSender:
    """Rank 0's side: (phase, done, total) to the queue, at most every ``interval`` seconds and
    at the end of each phase; fire and forget (an actor runs one caller's calls in order)."""

    def __init__(self, q: Queue, interval: float = 0.5):
        self.actor, self.interval, self.last = q.actor, interval, 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= self.interval:
            self.last = now
            self.actor.put_nowait.remote((phase, int(done), int(total)))


class EpochProgress:
    """``with EpochProgress(epochs, steps, done, world) as p: trainer.fit()``, with
    ``p.callback`` in the RunConfig and ``p.queue`` handed to the workers."""

    def __init__(self, epochs: int, steps_per_epoch: int, done: int = 0, world_size: int = 1):
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _ToQueue(self.queue)
        self.epochs, self.steps, self.done, self.world = epochs, steps_per_epoch, done, world_size
        self.last: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._center = None  # bar over the normal samples (all ranks: rank 0's count x world size)
        self._center_done = done > 0
        self._steps = None  # bar over every optimiser step still to run

    def __enter__(self) -> "EpochProgress":
        self._thread.start()
        return self

    def _steps_bar(self):
        if self._steps is None:
            self._steps = bar(total=max(0, self.epochs - self.done) * self.steps, desc=f"epoch {self.done + 1}",
                              unit="step")
        return self._steps

    def _close_center(self) -> None:
        self._center_done = True
        if self._center is not None:
            self._center.close()
            self._center = None

    def _on_metrics(self, m: dict) -> None:
        self.last = m
        if m.get("epoch") == 0:
            self._close_center()
        write = (self._steps or self._center or bar(disable=True)).write
        write(format_epoch(m))
        if 0 < m.get("epoch", 0) < self.epochs and self._steps is not None:
            self._steps.set_description(f"epoch {m['epoch'] + 1}", refresh=False)

    def _on_progress(self, phase: str, done: int, total: int) -> None:
        if phase == "center":
            if self._center_done:
                return
            if self._center is None:
                self._center = bar(total=total * self.world, desc="center pass", unit="img")
            self._center.update(min(done, total) * self.world - self._center.n)
        elif phase.startswith("epoch "):
            self._close_center()
            epoch = int(phase.split()[1])
            b = self._steps_bar()
            b.update((epoch - 1 - self.done) * self.steps + min(done, total) - b.n)

    def _handle(self, item) -> None:
        if isinstance(item, dict):
            self._on_metrics(item)
        else:
            self._on_progress(*item)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._handle(self.queue.get(timeout=0.5))
            except (Empty, _queue.Empty):
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to show
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            while True:
                self._handle(self.queue.get_nowait())
        except Exception:
            pass
        self._close_center()
        if self._steps is not None:
            self._steps.close()
        try:
            ray.kill(self.queue.actor)
        except Exception:
            pass
