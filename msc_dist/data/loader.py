"""Streaming loader: each (rank, loader worker) reads its planned ranges, filters by label,
decodes to fixed-size uint8 and yields whole batches. Augmentation happens later, on the
training device, so the CPU only decodes and resizes (the paper's code spends most of its time
in per-image CPU transforms).

A batch is a dict: images (b, 3, S, S) uint8, labels (b,) long (-1 = unlabelled), keys [str],
sources [str], corrupt [str] (keys skipped since the previous batch because they did not decode)."""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msc_dist.data.decode import DEFAULT_MAX_PIXELS, BadImage, check_resize_mode, decode_image
from msc_dist.data.device_decode import probe
from msc_dist.data.plan import Range, plan
from msc_dist.data.shards import DatasetInfo, iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelFilter:
    """Which samples a stream keeps. labels=None keeps all; otherwise a sample is kept when its
    label is in ``labels``, or when it has no label and ``keep_unlabelled`` (normal by default)."""

    labels: frozenset[int] | None = None
    keep_unlabelled: bool = True

    def __call__(self, label: int | None) -> bool:
        if self.labels is None:
            return True
        return self.keep_unlabelled if label is None else label in self.labels


def kept_counts(info: DatasetInfo, keep: LabelFilter) -> list[tuple[str, int]]:
    return [(s.url, s.count_where(keep)) for s in info.shards]


def _iter_range(r: Range, keep: LabelFilter):
    """Samples [start, stop) among the kept ones of a shard; stops reading once past ``stop``."""
    i = 0
    for s in iter_samples(r.url):
        if not keep(s.label):
            continue
        if i >= r.stop:
            return
        if i >= r.start:
            yield s
        i += 1


class ShardStream(IterableDataset):
    def __init__(
        self,
        counts: list[tuple[str, int]],
        keep: LabelFilter,
        image_size: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        *,
        train: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 256,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        encoded: bool = False,
        resize_mode: str,
    ):
        """``encoded``: yield the encoded bytes (``encoded`` in the batch, header-checked against
        ``max_pixels``) for ``device_decode.materialize`` to decode on the device.
        ``resize_mode``: how images become S x S (decode.RESIZE_MODES); training streams squash
        (views are random crops of the whole image), embedding streams take the config's."""
        self.counts, self.keep, self.image_size, self.batch_size = counts, keep, image_size, batch_size
        self.world_size, self.rank, self.train = world_size, rank, train
        self.seed, self.epoch, self.shuffle_buffer, self.max_pixels = seed, epoch, shuffle_buffer, max_pixels
        self.encoded, self.resize_mode = encoded, check_resize_mode(resize_mode)

    def _ranges(self, n_workers: int, worker: int, pass_: int) -> list[Range]:
        # Training reshuffles shard order every epoch (and every wrap-around pass), identically
        # on all ranks, so the union over ranks is still an exact partition.
        shuffle = self.seed * 1_000_003 + self.epoch * 1009 + pass_ if self.train else None
        return plan(self.counts, self.world_size, self.rank, n_workers, worker, shuffle)

    def _decoded(self, n_workers: int, worker: int):
        """(sample, array or None, error) in plan order; training wraps around until the
        consumer stops, and gives up on a pass that decoded nothing (all corrupt or empty)."""
        pass_ = 0
        while True:
            ok = 0
            for r in self._ranges(n_workers, worker, pass_):
                for s in _iter_range(r, self.keep):
                    try:
                        if self.encoded:
                            probe(s.data, self.max_pixels)
                            arr = s.data
                        else:
                            arr = decode_image(s.data, self.image_size, self.max_pixels, resize_mode=self.resize_mode)
                    except BadImage as e:
                        yield s, None, e
                        continue
                    ok += 1
                    yield s, arr, None
            if not self.train or ok == 0:
                return
            pass_ += 1

    def _shuffled(self, it, rng: random.Random):
        if not self.train or self.shuffle_buffer <= 1:
            yield from it
            return
        buf = []
        for item in it:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        n_workers, worker = (wi.num_workers, wi.id) if wi else (1, 0)
        return self._iter_worker(n_workers, worker)

    def _iter_worker(self, n_workers: int, worker: int) -> Iterator[dict]:
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        imgs, labels, keys, sources, corrupt = [], [], [], [], []
        for s, arr, err in self._shuffled(self._decoded(n_workers, worker), rng):
            if arr is None:
                log.warning("skipping corrupt sample key=%s shard=%s: %s", s.key, s.source, err)
                corrupt.append(s.key)
                continue
            imgs.append(arr)
            labels.append(-1 if s.label is None else s.label)
            keys.append(s.key)
            sources.append(s.source)
            if len(imgs) == self.batch_size:
                yield _collate(imgs, labels, keys, sources, corrupt, self.encoded)
                imgs, labels, keys, sources, corrupt = [], [], [], [], []
        if (imgs or corrupt) and not self.train:
            yield _collate(imgs, labels, keys, sources, corrupt, self.encoded)
        elif corrupt:
            yield _collate([], [], [], [], corrupt, self.encoded)


def _collate(imgs, labels, keys, sources, corrupt, encoded: bool = False) -> dict:
    if encoded:
        return {"encoded": imgs, "labels": torch.tensor(labels, dtype=torch.long), "keys": keys, "sources": sources,
                "corrupt": corrupt}
    if imgs:
        # (b, 3, S, S) uint8 view of the (b, S, S, 3) stack: channels_last strides, no transposing
        # copy (a tenth of the loader's time at 224 px). The models run in channels_last (features.place),
        # and the embedding job, scorer and server feed the same layout, so every path computes alike.
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    else:
        x = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return {
        "images": x,
        "labels": torch.tensor(labels, dtype=torch.long),
        "keys": keys,
        "sources": sources,
        "corrupt": corrupt,
    }


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False, threads: bool = False):
    """``num_workers`` DataLoader worker processes over ``stream`` (0: in this process), or with
    ``threads`` as many decode threads in this process (``ThreadLoader``: the same batches in the
    same order, without the worker processes)."""
    if threads and num_workers > 0:
        return ThreadLoader(stream, num_workers)
    # batch_size=None: the stream yields whole batches itself (per loader worker).
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH if num_workers > 0 else None,
        persistent_workers=False,
    )


PREFETCH = 4  # batches each loader worker (process or thread) holds ready


class ThreadLoader:
    """The DataLoader's batches, made by ``num_workers`` threads of this process: worker i of n
    reads the same planned ranges as DataLoader worker i, and the batches come round-robin over
    the workers still running, as the DataLoader's do, so the two give the same batches in the
    same order. For CPU devices: Pillow decodes and resizes with the GIL released, so the
    threads overlap the forward, and nothing is copied between processes. On a 2-core CPU at
    224 px the path from shards to ONNX Runtime / OpenVINO features ran at 0.84 / 0.66 of the
    forward alone with worker processes, 0.87 / 0.88 with threads (README, "The loader on a
    CPU"). An error in a worker is raised in the consumer; a consumer that stops early stops the
    threads."""

    def __init__(self, stream: ShardStream, num_workers: int, prefetch: int = PREFETCH):
        if num_workers < 1:
            raise ValueError(f"ThreadLoader needs at least 1 worker, got {num_workers}")
        self.stream, self.num_workers, self.prefetch = stream, int(num_workers), int(prefetch)

    def __iter__(self) -> Iterator[dict]:
        n = self.num_workers
        queues = [queue.Queue(self.prefetch) for _ in range(n)]
        stop = threading.Event()

        def put(q: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work(i: int) -> None:
            try:
                for batch in self.stream._iter_worker(n, i):
                    if not put(queues[i], batch):
                        return
                put(queues[i], _END)
            except BaseException as e:  # raised in the consumer, with its traceback
                put(queues[i], _Failed(e))

        threads = [threading.Thread(target=work, args=(i,), name=f"msc-loader-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        try:
            live = list(range(n))
            while live:
                for i in list(live):
                    item = queues[i].get()
                    if item is _END:
                        live.remove(i)
                    elif isinstance(item, _Failed):
                        raise item.error
                    else:
                        yield item
        finally:
            stop.set()
            for t in threads:
                t.join()


_END = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException
