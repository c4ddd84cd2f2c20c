"""Learning-rate schedules: linear warmup, then linear decay to 0, cosine decay to 0, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``step`` optimizer steps (for ``torch.optim.lr_scheduler.LambdaLR``).

    Args:
        schedule: "linear" | "cosine" | "constant" (after warmup).
        warmup_steps: steps of linear increase from 0 to 1.
        total_steps: all optimizer steps; the decay reaches 0 there.
    """
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"train.schedule: {schedule!r} is not one of 'linear', 'cosine', 'constant'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
