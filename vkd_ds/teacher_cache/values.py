"""What a cache stores per position: the teacher's values (teacher_rows) and their types on disk."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vkd_ds.losses import LOG_ZERO, chunk_rows

PRECISIONS = {"fp16": np.float16, "fp32": np.float32}


@torch.no_grad()
def teacher_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int,
    top_k: int,
    temperature: float,
    chunk_tokens: int = 256,
) -> dict[str, torch.Tensor]:
    """The cache's values at the valid positions of `mask` (row-major order) from the teacher's
    logits [B,S,Vt]: ids [N,k] (most probable first), logp [N,k] at T, tail [N] (log of the rest at
    T, LOG_ZERO when there is none), entropy [N] and target_logp [N] at T = 1. fp32 per chunk."""
    flat = logits.flatten(0, 1)
    index = mask.flatten().nonzero(as_tuple=True)[0]
    flat_targets = targets.flatten()
    n = index.numel()
    out = {
        "ids": torch.empty((n, top_k), dtype=torch.int64),
        "logp": torch.empty((n, top_k)),
        "tail": torch.full((n,), LOG_ZERO),
        "entropy": torch.empty(n),
        "target_logp": torch.empty(n),
    }
    for start in range(0, n, chunk_rows(chunk_tokens, vocab_size)):
        sel = index[start : start + chunk_rows(chunk_tokens, vocab_size)]
        rows = slice(start, start + sel.numel())
        z = flat[sel, :vocab_size].float()
        log_p1 = F.log_softmax(z, dim=-1)
        out["entropy"][rows] = -(log_p1.exp() * log_p1).sum(-1).cpu()
        out["target_logp"][rows] = log_p1.gather(1, flat_targets[sel][:, None]).squeeze(1).cpu()
        del log_p1
        values, ids = z.topk(top_k, dim=-1, sorted=True)
        z_t = z.div_(temperature)
        lse = torch.logsumexp(z_t, dim=-1)
        out["ids"][rows] = ids.cpu()
        out["logp"][rows] = (values / temperature - lse[:, None]).clamp_(min=LOG_ZERO).cpu()
        if top_k < vocab_size:
            outside = z_t.scatter_(1, ids, float("-inf"))
            out["tail"][rows] = (torch.logsumexp(outside, dim=-1) - lse).clamp_(min=LOG_ZERO).cpu()
    return out


def id_dtype(vocab_size: int):
    """The narrowest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def array_dtypes(vocab_size: int, precision: str, valence: bool) -> dict[str, np.dtype]:
    real = PRECISIONS[precision]
    dtypes = {
        "ids": id_dtype(vocab_size),
        "logp": real,
        "tail": real,
        "entropy": real,
        "target_logp": real,
    }
    if valence:
        dtypes["valence"] = real
    return {name: np.dtype(t) for name, t in dtypes.items()}


def bytes_per_position(vocab_size: int, precision: str, top_k: int, valence_k: int | None) -> int:
    """What one position costs on disk (the offsets, 8 bytes per record, come on top)."""
    dtypes = array_dtypes(vocab_size, precision, valence_k is not None)
    widths = {"ids": top_k, "logp": top_k, "valence": valence_k or 0}
    return sum(dtype.itemsize * widths.get(name, 1) for name, dtype in dtypes.items())


def valid_positions(loss_mask) -> int:
    """Positions with a target: position t predicts token t+1 (losses.shift_for_next_token)."""
    return int(sum(loss_mask[1:]))
