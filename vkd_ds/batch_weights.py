"""The valence weights w_i of a global batch's documents (docs/objective.md, Weights), computed alike on
every world size."""

from __future__ import annotations

import numpy as np
import torch

from vkd_ds import dist
from vkd_ds.data import global_batch_order
from vkd_ds.sequences import to_device
from vkd_ds.valence import effective_sample_size, masked_mean_std, valence_weights


def global_batch_weights(
    saliencies: list[torch.Tensor],
    valid: list[torch.Tensor],
    counts: np.ndarray,
    *,
    lam: float,
    z_max: float | None,
    normalize: bool,
    eps: float,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """w_i of this rank's micro-batches, from the saliencies of the whole global batch (collective).
    `saliencies`, `valid`: this rank's, one [documents] tensor per micro-step; `counts`: [accum, world]
    documents of every rank's micro-batches; `lam`, `z_max`, `normalize`, `eps`: `valence_weights`'.
    Returns this rank's weights per micro-step, Σw over the global batch (alike on every rank) and the
    batch's statistics.

    The gathered vector is ordered (micro-step, rank, document), the order in which one rank
    with the concatenated batch would hold it, so every world size computes the same weights.
    Micro-batches hold different numbers of documents when rows are packed: each is padded to the
    step's largest for the gather, and the padding dropped again by `counts` (known on every rank).
    A sequence with no valid position gets weight 0 and stays out of the batch statistics.
    """
    world, rank = dist.world_size(), dist.rank()
    slots = int(counts.max())
    local = torch.zeros((len(saliencies), slots, 2), dtype=saliencies[0].dtype, device=saliencies[0].device)
    for a, (s, v) in enumerate(zip(saliencies, valid, strict=True)):
        local[a, : s.numel(), 0] = s
        local[a, : s.numel(), 1] = v.to(s.dtype)
    ordered = global_batch_order(dist.all_gather(local))  # [accum·world·slots, 2], (micro-step, rank, slot)
    # The filled slots, found from `counts` on the host (a boolean index on the device would wait for it).
    filled = np.flatnonzero((np.arange(slots)[None, None, :] < counts[:, :, None]).ravel())
    rows = ordered.index_select(0, to_device(torch.from_numpy(filled), ordered.device))  # [documents, 2]
    global_s, global_valid = rows[:, 0], rows[:, 1] > 0
    w = valence_weights(global_s, lam, z_max, normalize, eps, valid=global_valid)
    flat = counts.ravel()
    starts = np.cumsum(flat) - flat
    mine = [w[int(starts[a * world + rank]) :][: int(counts[a, rank])] for a in range(len(saliencies))]
    # The saliency's statistics over the valid documents (over all of them when none is valid);
    # device tensors, read with the step's commit.
    keep = global_valid | ~global_valid.any()
    mean, std = masked_mean_std(global_s.double(), keep)
    stats = {
        "ess": effective_sample_size(w, global_valid),
        "weight_max": w.max(),
        "saliency_mean": mean,
        "saliency_std": std,
    }
    return list(mine), w.sum(), stats
