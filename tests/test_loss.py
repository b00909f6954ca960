import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msc_dist.loss import mean_shift, msc_loss


def reference_msc(z1, z2, c, t, w):
    """Plain float64 numpy transcription of the formula, loop by loop."""
    z1, z2, c = (np.asarray(a, dtype=np.float64) for a in (z1, z2, c))
    b = z1.shape[0]
    s = np.concatenate([z1 - c, z2 - c])
    u = s / np.linalg.norm(s, axis=1, keepdims=True)
    total = 0.0
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        denom = sum(np.exp(u[i] @ u[j] / t) for j in range(2 * b) if j != i)
        total += -np.log(np.exp(u[i] @ u[pos] / t) / denom)
    contrastive = total / (2 * b)
    angular = (np.sum((z1 - c) ** 2, axis=1).mean() + np.sum((z2 - c) ** 2, axis=1).mean())
    return contrastive + w * angular


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("t,w", [(0.25, 1.0), (0.5, 0.0), (0.1, 2.5)])
def test_msc_loss_matches_float64_reference(t, w):
    z1, z2 = _unit(8, 16, seed=1), _unit(8, 16, seed=2)
    c = F.normalize(z1.mean(0) + z2.mean(0), dim=0)
    got = msc_loss(z1, z2, c, temperature=t, angular_weight=w).item()
    assert got == pytest.approx(reference_msc(z1, z2, c, t, w), abs=1e-6)
    # float32 inputs too, as in training
    got32 = msc_loss(z1.float(), z2.float(), c.float(), temperature=t, angular_weight=w).item()
    assert got32 == pytest.approx(reference_msc(z1, z2, c, t, w), abs=1e-5)


def test_global_keys_equal_local_when_alone_and_differ_with_others():
    z1, z2 = _unit(6, 8, seed=3), _unit(6, 8, seed=4)
    c = F.normalize(z1.mean(0), dim=0)
    local = msc_loss(z1, z2, c)
    k1, k2 = mean_shift(z1, c)[1], mean_shift(z2, c)[1]
    assert msc_loss(z1, z2, c, global_keys=(k1, k2), offset=0).item() == pytest.approx(local.item(), abs=1e-10)

    # Two "ranks": the global loss averaged over ranks equals the reference over the full batch's
    # anchors with full-batch negatives, i.e. the single-process loss on the concatenated batch.
    a1, a2 = _unit(6, 8, seed=5), _unit(6, 8, seed=6)
    K1 = torch.cat([k1, mean_shift(a1, c)[1]])
    K2 = torch.cat([k2, mean_shift(a2, c)[1]])
    r0 = msc_loss(z1, z2, c, global_keys=(K1, K2), offset=0)
    r1 = msc_loss(a1, a2, c, global_keys=(K1, K2), offset=6)
    full = msc_loss(torch.cat([z1, a1]), torch.cat([z2, a2]), c)
    assert ((r0 + r1) / 2).item() == pytest.approx(full.item(), abs=1e-10)


def test_loss_gradients_flow_and_shapes_are_checked():
    z1 = _unit(4, 8, seed=7).requires_grad_()
    z2 = _unit(4, 8, seed=8).requires_grad_()
    c = F.normalize(torch.ones(8, dtype=torch.float64), dim=0)
    msc_loss(z1, z2, c).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    with pytest.raises(ValueError, match="center"):
        msc_loss(z1, z2, torch.ones(7, dtype=torch.float64))
