"""Fault injection for the tests of the non-finite guard (environment variables; none in normal runs)."""

from __future__ import annotations

import os

import torch


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is NaN everywhere."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _points(variable: str) -> set[tuple[int, int]]:
    """(step, rank) pairs to inject a fault at, e.g. `VKD_FAULT_NAN_LOSS="3:1,4:1"` (steps count from 1)."""
    spec = os.environ.get(variable, "").strip()
    if not spec:
        return set()
    return {(int(a), int(b)) for a, b in (item.split(":") for item in spec.split(","))}


class Faults:
    """The hooks for testing the non-finite guard, from the environment: VKD_FAULT_NAN_LOSS makes a
    step's loss NaN on a rank, VKD_FAULT_NAN_GRAD only its gradient. Unset in normal runs."""

    def __init__(self):
        self.nan_loss = _points("VKD_FAULT_NAN_LOSS")
        self.nan_grad = _points("VKD_FAULT_NAN_GRAD")

    def inject(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """`loss` of step `step` (0-based) on `rank`, with the faults due there."""
        if (step + 1, rank) in self.nan_loss:
            loss = loss * float("nan")
        if (step + 1, rank) in self.nan_grad:
            loss = _NanGradient.apply(loss)  # the loss stays finite
        return loss
