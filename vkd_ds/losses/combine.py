"""From the terms to the loss: L_base per sequence (Σ λ·term) and this rank's share of the
global batch's weighted mean."""

from __future__ import annotations

import torch


def combine_terms(terms: dict[str, torch.Tensor], lambdas: dict[str, float]) -> torch.Tensor:
    """L_base per sequence: Σ_term λ_term · term[B]. Terms with λ = 0 may be absent, and so may
    terms not computed at this step (L_seq between rollouts)."""
    total = None
    for name, lam in lambdas.items():
        if lam == 0 or name not in terms:
            continue
        part = lam * terms[name]
        total = part if total is None else total + part
    return total


def weighted_batch_loss(
    base: torch.Tensor, weights: torch.Tensor, global_weight_sum: torch.Tensor | float
) -> torch.Tensor:
    """This rank's share of L = Σ_{i∈B} w_i L_base^i / Σ_{i∈B} w_i, where the denominator is over the
    whole global batch (all ranks and micro-steps). Summing the shares over ranks and micro-steps gives L."""
    return (weights * base).sum() / global_weight_sum
