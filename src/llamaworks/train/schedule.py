"""The paper's learning-rate schedule (section 2.3), as a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, warmup_steps: int = 2000, decay_steps: int = 250_000,
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps` (2,000 in the paper), then cosine decay from
    max_lr to min_lr_ratio * max_lr (10%) at `decay_steps`, constant after that.
    Warm-up starts at max_lr / warmup_steps rather than 0 so the first step moves.
    """
    min_lr = min_lr_ratio * max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
