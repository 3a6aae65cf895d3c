"""The learning rate at each step: constant (Open-Sora v1.0), or warm-up then cosine decay.

    lr_at(tc, step)  ->  the learning rate for optimizer step `step` (0-based, the step about to run)

      constant: tc.lr at every step
      cosine:   tc.lr * (step + 1) / warmup_steps            while step < warmup_steps
                min + (tc.lr - min) * (1 + cos(pi * s)) / 2   after, s = progress from warm-up end
                                                              to tc.steps in [0, 1]; min = lr_min_ratio * lr

It depends on the step alone (no scheduler object with state), so a run resumed from a checkpoint,
or restarted on fewer workers, follows the same curve, and the registry can log it after the fact.
The local preset stays constant: on its budget, every cosine run tried lost the direction of
motion (README, measured).
"""

from __future__ import annotations

import math

from soraflow.configs.schema import TrainConfig


def lr_at(tc: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based); see the module docstring."""
    if tc.lr_schedule == "constant":
        return tc.lr
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    s = min(1.0, (step - tc.warmup_steps) / span)
    low = tc.lr * tc.lr_min_ratio
    return low + (tc.lr - low) * 0.5 * (1.0 + math.cos(math.pi * s))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
