"""Exact, deterministic split of a sample stream across ranks and loader workers.

The (filtered) samples of all shards form one global sequence of N samples, in shard order
(shuffled per epoch with a seed every rank shares). Rank r takes the contiguous slice
[r*N//W, (r+1)*N//W) and its loader worker k a contiguous sub-slice of that. A slice may start
or end inside a shard, so the split works with uneven shards and with fewer shards than
ranks x workers, and no sample is dropped or counted twice (the center needs that). Ranks then
differ by at most one sample; training runs a fixed number of steps per epoch computed from
the smallest share, so every rank steps the same number of times and DDP never hangs."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    url: str
    start: int  # ordinal among the *kept* samples of this shard
    stop: int


def _slice(counts: list[tuple[str, int]], lo: int, hi: int) -> list[Range]:
    out, base = [], 0
    for url, n in counts:
        s, e = max(lo, base), min(hi, base + n)
        if s < e:
            out.append(Range(url, s - base, e - base))
        base += n
        if base >= hi:
            break
    return out


def bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    return i * n // parts, (i + 1) * n // parts


def plan(
    counts: list[tuple[str, int]],
    world_size: int,
    rank: int,
    num_workers: int = 1,
    worker: int = 0,
    shuffle_seed: int | None = None,
) -> list[Range]:
    """The ranges that (rank, worker) reads. counts: (shard url, kept samples) in shard order."""
    counts = [(u, n) for u, n in counts if n > 0]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(counts)
    total = sum(n for _, n in counts)
    r_lo, r_hi = bounds(total, world_size, rank)
    w_lo, w_hi = bounds(r_hi - r_lo, max(1, num_workers), worker)
    return _slice(counts, r_lo + w_lo, r_lo + w_hi)


def rank_share(total: int, world_size: int, rank: int) -> int:
    lo, hi = bounds(total, world_size, rank)
    return hi - lo


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Same on every rank: full batches in the smallest rank share."""
    return (total // world_size) // batch_size
