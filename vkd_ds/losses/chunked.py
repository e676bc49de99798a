"""The per-token losses over the vocabulary, chunk by chunk: each chunk's loss against its rows
(CE's targets, the teacher's logits or its sparse cache) and the autograd function that keeps
only their gradient, in the logits' dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vkd_ds.losses.chunks import chunk_rows
from vkd_ds.losses.divergences import DIVERGENCES, Divergence
from vkd_ds.losses.sparse import SparseTeacher, sparse_chunk

RowsLoss = Callable[[torch.Tensor, slice, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_chunk(student: torch.Tensor, targets: torch.Tensor):
    log_p = F.log_softmax(student, dim=-1)
    loss = -log_p.gather(-1, targets[:, None]).squeeze(-1)
    grad = log_p.exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return loss, grad


def ce_rows(targets: torch.Tensor) -> RowsLoss:
    """CE of a chunk against the target ids, `targets` indexed by flat position."""
    return lambda student, rows, sel: cross_entropy_chunk(student, targets[sel])


def divergence_rows(teacher, divergence: Divergence, vocab_size: int, by_position: bool) -> RowsLoss:
    """The divergence of a chunk to the teacher: `teacher` a SparseTeacher (rows in selected order), or
    logits indexed by flat position (`by_position`) or already selected ([N, Vt], rows in order)."""
    if isinstance(teacher, SparseTeacher):
        return lambda student, rows, sel: sparse_chunk(student, teacher, rows, divergence)

    def rows_loss(student, rows, sel):
        # A divergence overwrites its inputs: the teacher's rows are a copy (they serve backward too).
        teacher_rows = teacher[sel if by_position else rows, :vocab_size].to(torch.float32, copy=True)
        return DIVERGENCES[divergence.kind](student, teacher_rows, divergence)

    return rows_loss


class ChunkedTokenLoss(torch.autograd.Function):
    """Per-token loss over selected positions, computed chunk by chunk.

    Forward stores only d(loss)/d(logits), in the logits' dtype and already laid out as the logits'
    gradient (0 at the positions not selected and past `vocab_size`); backward scales it in place by
    the incoming per-token gradient and hands it back, so it allocates no second [tokens, vocab]
    tensor. (This graph cannot be backpropagated twice, which the trainer never does.)
    """

    @staticmethod
    def forward(ctx, logits, flat_index, rows_loss, vocab_size, chunk_tokens, into=None):
        """`rows_loss(student, rows, sel)`: (per-token loss, d loss/d student) of one chunk: `student` the
        fp32 logits of the flat positions `sel` (an overwritable copy), `rows` the chunk's slice of
        the selected positions (`ce_rows`, `divergence_rows`). `into`: a [positions, width] tensor of
        the logits' dtype the gradient may be stored in (the teacher's logits, which `rows_loss` has
        read at a chunk's positions before its gradient is written there); None: a new one."""
        flat_logits = logits.flatten(0, 1)
        num_tokens = flat_index.numel()
        chunk_tokens = chunk_rows(chunk_tokens, vocab_size)
        losses = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        grads = None
        if logits.requires_grad:
            fits = into is not None and into.shape == flat_logits.shape and into.dtype == logits.dtype
            grads = into if fits and into.device == logits.device else torch.empty_like(flat_logits)
        held = None if grads is None else grads[:, :vocab_size]
        for start in range(0, num_tokens, chunk_tokens):
            sel = flat_index[start : start + chunk_tokens]
            student = flat_logits[sel, :vocab_size].float()  # advanced indexing: a copy, ours to overwrite
            loss, grad = rows_loss(student, slice(start, start + len(sel)), sel)
            del student
            losses[start : start + chunk_tokens] = loss
            if held is not None:
                held.index_copy_(0, sel, grad.to(grads.dtype))
            del grad
        if grads is not None:
            unselected = torch.ones(grads.shape[0], dtype=torch.bool, device=grads.device)
            unselected[flat_index] = False
            grads.masked_fill_(unselected[:, None], 0)
            if grads.shape[1] > vocab_size:
                grads[:, vocab_size:] = 0
        ctx.save_for_backward(flat_index, grads)
        ctx.logits_shape = logits.shape
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        flat_index, grads = ctx.saved_tensors
        # The stored gradient is already rounded to the logits' dtype once; the per-token scale stays
        # fp32 and each chunk's product is rounded once more, not the scale and then the product.
        scale = torch.zeros(grads.shape[0], dtype=torch.float32, device=grads.device)
        scale[flat_index] = grad_losses.float()
        if grads.dtype == torch.float32:
            grads.mul_(scale[:, None])
        else:
            for start in range(0, grads.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                grads[rows] = _scaled(grads[rows], scale[rows])
        return grads.view(ctx.logits_shape), None, None, None, None, None


def _scaled(grad_rows: torch.Tensor, scale_rows: torch.Tensor) -> torch.Tensor:
    """grad_rows · scale_rows[:, None], computed in fp32 and rounded once to grad_rows' dtype."""
    return (grad_rows.float() * scale_rows[:, None]).to(grad_rows.dtype)
