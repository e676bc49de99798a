"""The token-level terms per sequence on the student's logits: the soft term, CE, log-probabilities,
the next-token targets they are scored against, and L_seq from the weighted CE."""

from __future__ import annotations

import torch

from vkd_ds.losses.chunked import ChunkedTokenLoss, ce_rows, divergence_rows
from vkd_ds.losses.divergences import Divergence
from vkd_ds.losses.sparse import SparseTeacher
from vkd_ds.sequences import HOST_SHIFTED, Sequences, next_token, selected


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Token-level KD per sequence: mean over valid positions of T²·D(softmax(z_T/T), softmax(z_S/T)),
    D the divergence `kind` (DIVERGENCES; forward_kl: KL(p_T‖p_S), Hinton's soft KD), `beta` jsd's
    and `alpha` the skew divergences' parameter.

    student_logits [B,S,Vs], teacher_logits [B,S,Vt], mask [B,S] bool -> [B] fp32 (0 for a sequence
    with no valid position). Only the first `vocab_size` logits are compared (default: the smaller
    width), so embeddings padded past the tokenizer do not matter.
    """
    divergence = Divergence(kind, float(temperature), float(beta), float(alpha))
    return divergence_per_sequence(student_logits, teacher_logits, mask, divergence, vocab_size, chunk_tokens)


def divergence_per_sequence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    mask: torch.Tensor,
    divergence: Divergence,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    sequences: Sequences | None = None,
    overwrite_teacher: bool = False,
) -> torch.Tensor:
    """`token_divergence` with the divergence given as a Divergence; `teacher` the teacher's logits
    [B,S,Vt], or a SparseTeacher of the selected positions (the teacher cache's top-k and tail).
    `sequences`: which sequence each position is in (a packed batch's); default one per row.
    `overwrite_teacher`: the teacher's logits are not read again (training's soft term), so where they
    have the student's logits' shape and dtype the gradient is stored in them, not in a new
    [tokens, vocab] tensor; they then hold that gradient."""
    seqs = Sequences.of(mask, sequences)
    flat_index = selected(mask)
    if isinstance(teacher, SparseTeacher):
        vocab = vocab_size or student_logits.shape[-1]
        if len(teacher) != flat_index.numel():
            raise ValueError(f"the sparse teacher has {len(teacher)} rows for {flat_index.numel()} valid positions")
        rows_loss = divergence_rows(teacher, divergence, vocab, by_position=False)
    else:
        vocab = vocab_size or min(student_logits.shape[-1], teacher.shape[-1])
        flat_teacher = teacher.detach().flatten(0, 1)
        rows_loss = divergence_rows(flat_teacher, divergence, vocab, by_position=True)
        into = flat_teacher if overwrite_teacher and teacher.is_contiguous() else None
        per_token = ChunkedTokenLoss.apply(student_logits, flat_index, rows_loss, vocab, chunk_tokens, into)
        return seqs.mean_selected(per_token, flat_index)
    per_token = ChunkedTokenLoss.apply(student_logits, flat_index, rows_loss, vocab, chunk_tokens)
    return seqs.mean_selected(per_token, flat_index)


def token_ce(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    token_weights: torch.Tensor | None = None,
    sequences: Sequences | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy per sequence: mean over valid positions of -log p_S(targets[b,t]);
    with `token_weights` [B,S] the weighted sum Σ_t w[b,t]·(−log p_S(targets[b,t])) instead (no mean).

    student_logits [B,S,V], targets [B,S] (the token following each position), mask [B,S] -> [B] fp32.
    """
    vocab = vocab_size or student_logits.shape[-1]
    flat_index = selected(mask)
    per_token = ChunkedTokenLoss.apply(student_logits, flat_index, ce_rows(targets.flatten()), vocab, chunk_tokens)
    return reduce_per_sequence(per_token, flat_index, Sequences.of(mask, sequences), token_weights)


def reduce_per_sequence(per_token, flat_index, seqs: Sequences, token_weights=None):
    if token_weights is None:
        return seqs.mean_selected(per_token, flat_index)
    weighted = per_token * token_weights.detach().flatten()[flat_index].to(per_token.dtype)
    return seqs.sum_selected(weighted, flat_index)


@torch.no_grad()
def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, vocab_size: int | None = None, chunk_tokens=1024
) -> torch.Tensor:
    """log p(targets[b,t]) at every valid position, 0 elsewhere: [B,S] fp32 (no gradient)."""
    vocab = vocab_size or logits.shape[-1]
    flat_index = selected(mask)
    nll = ChunkedTokenLoss.apply(logits.detach(), flat_index, ce_rows(targets.flatten()), vocab, chunk_tokens)
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=logits.device)
    out[flat_index] = -nll
    return out.view(mask.shape)


def shift_for_next_token(input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """(targets, mask) aligned with positions: position t predicts token t+1 when that token is a target
    (those `sequences.on_device` computed on the host for a batch's loss mask, else computed here)."""
    found = getattr(loss_mask, HOST_SHIFTED, None)
    return found if found is not None else next_token(input_ids, loss_mask)


def sequence_kd(weighted_nll: torch.Tensor, teacher_logprob: torch.Tensor) -> torch.Tensor:
    """L_seq per sequence for samples y of the student: value −(1/|y|) Σ_t log p_T(y_t | y_<t, x), gradient
    that of the REINFORCE surrogate Σ_t A_t·(−log p_S(y_t | y_<t, x)).

    weighted_nll [B]: that surrogate, differentiable (`token_ce` with the advantages A_t as token
    weights: A_t = R − b for a sequence reward, which gives docs/objective.md's −(R − b)·∇ log p_S(y|x));
    teacher_logprob [B]: mean log p_T of the sample's tokens, a constant."""
    return (-teacher_logprob).detach().to(weighted_nll.dtype) + weighted_nll - weighted_nll.detach()
