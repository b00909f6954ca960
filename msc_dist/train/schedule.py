"""The learning-rate schedule as a pure function of the global step (no scheduler state: a
resumed run recomputes the rate from the step it resumed at)."""

from __future__ import annotations

import math

from msc_dist.config import ConfigError
from msc_dist.train.config import LR_SCHEDULES


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based) of ``total_steps``:
    a linear warm-up over ``warmup_steps`` (step 0 runs at 1 / warmup_steps of the peak), then
    ``constant`` (1) or ``cosine`` (half a cosine from 1 down to 0 after the last step)."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; valid: {list(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))
