"""The global center of the normal features, all-reduced across the training ranks.

It lives beside the training loop (the only code that computes it): the scorer and serving load
a saved center and never import ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msc_dist import dist


def global_center(z_local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean of every rank's normal features, L2-normalised.

    (sum, count) travel together in one float64 all-reduce, so every sample counts exactly once
    whatever the per-rank counts: sum = [D] float64, count in the extra slot."""
    d = z_local.shape[1]
    packed = torch.zeros(d + 1, dtype=torch.float64)
    packed[:d] = z_local.double().sum(0).cpu()
    packed[d] = z_local.shape[0]
    packed = dist.all_reduce_sum(packed)
    n = int(packed[d].item())
    if n == 0:
        raise RuntimeError("no normal features on any rank: cannot compute the center")
    c = F.normalize(packed[:d] / n, dim=0)
    return c.float(), n
