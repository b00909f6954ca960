"""Collectives in real processes (gloo): global negatives with gradients, the exact center, and
no-op behaviour in a single process."""

import os
import socket

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from msc_dist import dist
from msc_dist.train.center import global_center
from msc_dist.loss import mean_shift, msc_loss


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    z2 = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(z1.mean(0), dim=0)
    return z1, z2, c


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    z1, z2, c = _data()
    b = 8 // world
    a1 = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
    a2 = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
    k1 = dist.all_gather_with_grad(mean_shift(a1, c)[1])
    k2 = dist.all_gather_with_grad(mean_shift(a2, c)[1])
    loss = msc_loss(a1, a2, c, global_keys=(k1, k2), offset=rank * b)
    loss.backward()
    # Uneven shares for the center: rank 0 has 3 rows, rank 1 has 5.
    rows = z1[:3] if rank == 0 else z1[3:]
    center, n = global_center(rows)
    out[rank] = {"loss": loss.item(), "g1": a1.grad / world, "g2": a2.grad / world, "center": center, "n": n,
                 "gathered": dist.gather_varlen(rows.float())}
    tdist.destroy_process_group()


def test_global_negatives_gradients_and_center_across_two_processes():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _port(), out), nprocs=2, join=True)
    z1, z2, c = _data()
    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = msc_loss(f1, f2, c)
    full.backward()
    # mean of the rank losses is the full-batch loss; DDP's averaged gradient is its gradient.
    assert abs((out[0]["loss"] + out[1]["loss"]) / 2 - full.item()) < 1e-10
    assert torch.allclose(torch.cat([out[0]["g1"], out[1]["g1"]]), f1.grad, atol=1e-10)
    assert torch.allclose(torch.cat([out[0]["g2"], out[1]["g2"]]), f2.grad, atol=1e-10)
    ref = F.normalize(z1.double().mean(0), dim=0).float()
    for r in (0, 1):
        assert out[r]["n"] == 8 and torch.allclose(out[r]["center"], ref, atol=1e-6)
        assert torch.equal(out[r]["gathered"], z1.float())


def test_single_process_helpers_are_no_ops():
    t = torch.arange(4.0)
    assert not dist.is_dist() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main_process()
    assert torch.equal(dist.all_reduce_sum(t), t) and dist.all_gather_with_grad(t) is t
    assert dist.gather_varlen(t) is t
    c, n = global_center(F.normalize(torch.randn(5, 3), dim=-1))
    assert n == 5 and abs(c.norm().item() - 1) < 1e-6
