"""All collectives live here. Every helper degrades to a no-op in a single process, so the
same code runs under Ray Train DDP, under torchrun, and in a plain test."""

from __future__ import annotations

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    """The predicate for rank-0-only side effects (writing checkpoints, logging summaries)."""
    return rank() == 0


def _comm_device(t: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors; NCCL needs CUDA ones.
    if is_dist() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; returns a new tensor on t's device and dtype."""
    if not is_dist():
        return t.clone()
    buf = t.detach().to(_comm_device(t)).clone()
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (W*B, ...), rank order; gradients flow back to each owner.
    All ranks must pass the same B."""
    if not is_dist():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, ...) tensors of different N_r from all ranks, in rank order, on every
    rank. No gradients. Used for evaluation features, where shard sizes differ."""
    if not is_dist():
        return t
    dev = _comm_device(t)
    n = torch.tensor([t.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    n_max = max(sizes_l)
    padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.detach().to(dev)
    out = [torch.zeros_like(padded) for _ in sizes_l]
    tdist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_l)]).to(t.device)


def barrier() -> None:
    if is_dist():
        tdist.barrier()
