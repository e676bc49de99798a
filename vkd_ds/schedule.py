"""The learning-rate schedule: linear warmup, then cosine decay to `lr × min_lr_ratio`.

vkd-ds owns this formula instead of DeepSpeed's WarmupCosineLR, which sets the LR to 0 until its
first `step()` (optimizer step 1 applied LR 0 and the whole schedule ran one step late, so the
last step never reached the minimum), and whose `last_batch_iteration: 0` fix applies the full
peak LR at step 1 instead.
"""

from __future__ import annotations

import math


def warmup_steps_used(warmup_steps: int, max_steps: int) -> int:
    """Warmup is cut short so that at least the last step decays (and reaches the minimum)."""
    return max(0, min(warmup_steps, max_steps - 1))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The multiple of the peak LR that optimizer step `step` (1, 2, ..., max_steps) applies.

    Warmup, steps 1..W: step / W (step W applies the peak). Decay, steps W+1..max_steps:
    min + (1 - min) · (1 + cos(π · (step - W) / (max_steps - W))) / 2, so the last step applies
    exactly `min_lr_ratio`. Steps past max_steps stay at the minimum. W = warmup_steps_used(...)."""
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    warmup = warmup_steps_used(warmup_steps, max_steps)
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """What `deepspeed.initialize(lr_scheduler=...)` takes: optimizer -> a LambdaLR of `lr_factor`.

    DeepSpeed steps it once per applied optimizer step, so after n applied steps the LR set in the
    optimizer is the one step n + 1 applies. The multiplier is a closure, not a callable object:
    LambdaLR's state_dict (in checkpoints) then holds only its step count, and a resumed run with
    a new trainer.max_steps follows the new schedule from where it is."""
    import torch

    def multiplier(steps_done: int) -> float:
        return lr_factor(steps_done + 1, warmup_steps, max_steps, min_lr_ratio)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    return build
