"""A torch.profiler summary of a few training steps, for people deciding what to speed up: the top
kernels by self device time (ops by self CPU time where the step runs on a CPU), the host syncs,
and the share of wall time the step loop spent waiting for its next batch."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterator

import torch

# Runtime calls and ops that block the host until the device catches up.
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "aten::item", "aten::_local_scalar_dense")
MARKS = ("loader_wait", "step")


def _row(e, total_us: float, key: str) -> dict:
    t = getattr(e, key)
    return {"name": e.key, "self_ms": round(t / 1000, 3), "share": round(t / total_us, 4) if total_us else None,
            "calls": e.count}


def summarize(prof, steps: int, wall_s: float, wait_s: float, device: torch.device, top: int = 20) -> dict:
    """The profiler's key averages -> the summary dict (times in ms; shares of ``wall_s``)."""
    from torch.autograd import DeviceType

    ka = [e for e in prof.key_averages() if e.key not in MARKS and not getattr(e, "is_user_annotation", False)]
    cuda = device.type == "cuda"
    if cuda:
        kernels = [e for e in ka if e.device_type == DeviceType.CUDA]
        key = "self_device_time_total"
    else:
        kernels = [e for e in ka if e.device_type == DeviceType.CPU]
        key = "self_cpu_time_total"
    busy_us = sum(getattr(e, key) for e in kernels)
    host_ops = sorted((e for e in ka if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                      reverse=True)
    syncs = [{"name": e.key, "calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 3)}
             for e in ka if e.key in SYNC_NAMES]
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {
        "bench": "profile", "device_kind": device.type, "steps": steps, "wall_s": round(wall_s, 4),
        "step_ms": round(1000 * wall_s / steps, 3),
        "loader_wait_share": round(wait_s / wall_s, 4),
        # Sum of the kernels' own time over wall time: near 1 when the device is the bound; far
        # under 1 when it waits on the loader, the host's launches or syncs.
        "device_busy_share": round(busy_us / 1e6 / wall_s, 4) if cuda else None,
        "kernel_launches_per_step": round(launches / steps, 1) if cuda else None,
        "host_syncs": syncs,
        "top": [_row(e, busy_us, key) for e in sorted(kernels, key=lambda e: getattr(e, key), reverse=True)[:top]],
        # On a GPU, the host's own time per op: large against the kernels' means launch-bound.
        "top_host_ops": [_row(e, wall_s * 1e6, "self_cpu_time_total") for e in host_ops[:top]] if cuda else [],
    }


def lines(s: dict) -> list[str]:
    """The summary for people: one line per figure, then the tables."""
    what = "kernels by self device time" if s["device_kind"] == "cuda" else "ops by self CPU time (no GPU)"
    out = [f"{k}: {s[k]}" for k in s if k in ("what", "steps", "step_ms", "loader_wait_share", "device_busy_share",
                                                "kernel_launches_per_step")]
    out.append("host syncs: " + (", ".join(f"{x['name']} x{x['calls']} ({x['cpu_ms']} ms)" for x in s["host_syncs"])
                                 or "none seen"))
    for title, rows in ((f"top {what}", s["top"]), ("top host ops by self CPU time (share of wall)", s["top_host_ops"])):
        if not rows:
            continue
        out.append(f"{title}:")
        out += [f"  {r['self_ms']:10.3f} ms  {100 * (r['share'] or 0):5.1f} %  x{r['calls']:<6} {r['name'][:110]}"
                for r in rows]
    return out


def profile_steps(step: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor], steps: int,
                  device: torch.device, out_dir: str, what: dict) -> dict:
    """Runs ``steps`` more steps on ``next(batches)`` under torch.profiler (CPU, plus CUDA on a
    GPU); writes ``out_dir``/profile.json (the summary) and profile.txt (the summary as lines,
    then the profiler's own table) and returns the summary. ``what``: the setting, copied in."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if steps < 1:
        raise ValueError(f"profile steps must be >= 1, got {steps}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wait = 0.0
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            with record_function("loader_wait"):
                x = next(batches)
            wait += time.perf_counter() - t
            with record_function("step"):
                last = step(x)
        float(last)  # wait for the device
        wall = time.perf_counter() - t0
    s = {"what": what, **summarize(prof, steps, wall, wait, device)}
    os.makedirs(out_dir, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(out_dir, "profile.txt.tmp"), "w") as f:
        f.write("\n".join(lines(s)) + "\n\n" + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    with open(os.path.join(out_dir, "profile.json.tmp"), "w") as f:
        json.dump(s, f, indent=1)
    for name in ("profile.txt", "profile.json"):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    return s
