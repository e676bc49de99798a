"""Seconds of each phase of an optimizer step (`trainer.time_phases`)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseClock:
    """Seconds of each phase of a step (`trainer.time_phases`), and `time/other`: what is left of the
    step (batching, the metric reductions, Python between phases). On GPUs every phase boundary
    synchronizes so that kernels count in the phase that launched them, which costs some speed;
    off by default."""

    def __init__(self, enabled: bool, synchronize: bool):
        self.enabled = enabled
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - started

    def metrics(self, step_seconds: float) -> dict[str, float]:
        if not self.enabled:
            return {}
        result = {f"time/{phase}": seconds for phase, seconds in sorted(self.seconds.items())}
        result["time/other"] = step_seconds - sum(self.seconds.values())
        return result
