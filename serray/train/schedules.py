"""Schedules indexed by global step: learning rate and EMA decay share one cosine helper (as in DINO)."""

from __future__ import annotations

import math


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, step: int = 0) -> float:
    """Value at ``step`` of a linear warm-up (0 -> base) followed by a cosine from ``base`` to ``final``.

    Args:
        base: value at the end of warm-up.
        final: value at ``total_steps`` (and after).
        total_steps: length of the schedule.
        warmup_steps: linear warm-up steps from 0 (use 0 for EMA decay).
        step: the global step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))
