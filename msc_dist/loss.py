"""The MSC objective as pure functions of tensors (no collectives, no module state).

Shapes: B = local batch, D = feature dim, W = world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_shift(z: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - c) and its re-normalised direction. z: (N, D) unit vectors, center: (D,)."""
    shifted = z - center
    return shifted, F.normalize(shifted, dim=-1)


def msc_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    center: torch.Tensor,
    temperature: float = 0.25,
    angular_weight: float = 1.0,
    *,
    global_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean-shifted NT-Xent plus the angular center loss.

    z1, z2: (B, D) L2-normalised features of two views of the same B images; center: (D,).

    contrastive: NT-Xent over the 2B mean-shifted, re-normalised features; each anchor's
        denominator runs over every other feature (self masked out, positive kept in),
        mean over all 2B anchors.
    angular: mean ||z1 - c||^2 + mean ||z2 - c||^2, weighted by ``angular_weight``.

    global_keys: optional (K1, K2), each (W*B, D), the *shifted, normalised* features of every
        rank (this rank's rows included, at rows offset:offset+B), gathered with gradients by the
        caller. Anchors stay local; negatives then span the global batch. ``offset`` is this
        rank's first row in K1/K2. With W = 1 this equals the local loss exactly.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if center.shape != z1.shape[1:]:
        raise ValueError(f"center must be ({z1.shape[1]},); got {tuple(center.shape)}")
    b = z1.shape[0]
    s1, u1 = mean_shift(z1, center)
    s2, u2 = mean_shift(z2, center)

    anchors = torch.cat([u1, u2])  # (2B, D)
    if global_keys is None:
        keys = anchors  # (2B, D)
        n_half, self_idx = b, torch.arange(2 * b, device=z1.device)
    else:
        k1, k2 = global_keys
        n_half = k1.shape[0]
        keys = torch.cat([k1, k2])  # (2WB, D)
        local = torch.arange(b, device=z1.device) + offset
        self_idx = torch.cat([local, local + n_half])
    # Positive of anchor i (view 1) is the same image in view 2, and vice versa.
    pos_idx = torch.cat([self_idx[b:], self_idx[:b]])

    logits = anchors @ keys.T / temperature  # (2B, 2B) or (2B, 2WB)
    logits = logits.masked_fill(F.one_hot(self_idx, keys.shape[0]).bool(), float("-inf"))
    # -log(exp(pos) / sum_{j != i} exp(l_ij)): cross-entropy with the positive as target.
    contrastive = F.cross_entropy(logits, pos_idx, reduction="mean")

    angular = s1.pow(2).sum(-1).mean() + s2.pow(2).sum(-1).mean()
    return contrastive + angular_weight * angular


def feature_stats(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Collapse statistics of a batch of unit features, summable across batches and ranks:
    float64 [sum of cos(z_i, z_j) over ordered pairs i != j, number of such pairs,
    sum of ||z_i - c||, n]. The mean pairwise cosine (sum / pairs) tends to 1 as the features
    collapse onto one point; ||z - c|| tends to 0 as they collapse onto the center."""
    z = z.detach().double()
    n = z.shape[0]
    s = z.sum(0)
    pairs = s.dot(s) - z.pow(2).sum()
    return torch.stack([pairs, z.new_tensor(float(n * (n - 1))), (z - center.double()).norm(dim=1).sum(),
                        z.new_tensor(float(n))])


def summarize_feature_stats(stats: torch.Tensor) -> dict[str, float]:
    """{feature_cos, zc_norm} from summed ``feature_stats``."""
    pairs, n_pairs, norms, n = (float(v) for v in stats)
    return {"feature_cos": pairs / n_pairs if n_pairs else float("nan"), "zc_norm": norms / n if n else float("nan")}
