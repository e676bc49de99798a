"""Loss terms (docs/objective.md) as pure functions of tensors (no collectives, no config).

Shapes: B sequences, S positions, V vocabulary. `mask[b, t]` marks the
positions whose prediction (of token t+1) counts. Every public term returns a
per-sequence value `[B]`: the mean over that sequence's valid positions, 0
for a sequence with none. The global reduction over the batch takes the
global weight sum as an argument (see `weighted_batch_loss`).

The per-token terms run over the vocabulary in token chunks, in fp32 per
chunk, and keep their gradient in the logits' dtype, so no fp32
`[tokens, vocab]` tensor of either model is ever materialized.

Modules: `chunks` (rows per chunk, `loss.chunk_tokens=auto`), `divergences` (`Divergence` and the
registry `DIVERGENCES`), `sparse` (the teacher cache's `SparseTeacher`, CE with its divergence in one
pass), `chunked` (the chunked autograd function and each chunk's loss), `token_terms` (the soft
term, CE, log-probabilities, next-token targets, L_seq), `fused_head` (both terms from the LM head's
input), `feature_terms` (L_val, L_feat, attention, InfoNCE), `combine` (Σ λ·term, the batch's share).
Each imports its siblings directly, never this package, which re-exports every public name.
"""

from vkd_ds.losses.chunked import RowsLoss
from vkd_ds.losses.chunks import (
    CHUNK_MEMORY_SHARE,
    CPU_CHUNK_BYTES,
    FUSED_MIN_ROWS,
    FUSED_ROWS,
    GPU_CHUNK_BYTES,
    chunk_row_bytes,
    chunk_rows,
    plan_chunk_rows,
)
from vkd_ds.losses.combine import combine_terms, weighted_batch_loss
from vkd_ds.losses.divergences import DIVERGENCES, FORWARD_KL_T1, Divergence
from vkd_ds.losses.feature_terms import attention_kd, feature_kd, info_nce, sequence_features, valence_mse
from vkd_ds.losses.fused_head import fused_head_losses
from vkd_ds.losses.sparse import LOG_ZERO, SparseTeacher, cached_token_losses
from vkd_ds.losses.token_terms import (
    divergence_per_sequence,
    sequence_kd,
    shift_for_next_token,
    token_ce,
    token_divergence,
    token_logprobs,
)

__all__ = [
    "CHUNK_MEMORY_SHARE",
    "CPU_CHUNK_BYTES",
    "DIVERGENCES",
    "FORWARD_KL_T1",
    "FUSED_MIN_ROWS",
    "FUSED_ROWS",
    "GPU_CHUNK_BYTES",
    "LOG_ZERO",
    "Divergence",
    "RowsLoss",
    "SparseTeacher",
    "attention_kd",
    "cached_token_losses",
    "chunk_row_bytes",
    "chunk_rows",
    "combine_terms",
    "divergence_per_sequence",
    "feature_kd",
    "fused_head_losses",
    "info_nce",
    "plan_chunk_rows",
    "sequence_features",
    "sequence_kd",
    "shift_for_next_token",
    "token_ce",
    "token_divergence",
    "token_logprobs",
    "valence_mse",
    "weighted_batch_loss",
]
