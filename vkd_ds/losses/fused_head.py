"""CE and the soft term straight from the LM head's input and weight (`loss.fused_head`): the
student's logits are rebuilt chunk by chunk and never exist whole."""

from __future__ import annotations

import torch

from vkd_ds.losses.chunked import cross_entropy_chunk, divergence_rows
from vkd_ds.losses.chunks import chunk_rows
from vkd_ds.losses.divergences import FORWARD_KL_T1, Divergence
from vkd_ds.losses.sparse import SparseTeacher
from vkd_ds.losses.token_terms import reduce_per_sequence
from vkd_ds.sequences import Sequences, selected


class _FusedHeadLosses(torch.autograd.Function):
    """Per-token CE and soft KD straight from the last hidden states and the LM head's weight.

    Forward and backward both rebuild each chunk's logits from `hidden @ weight.T`, so the
    student's `[tokens, vocab]` logits never exist, in any dtype: memory is O(chunk × vocab).
    Backward recomputes the chunk (one extra matmul) because the weight's gradient
    Σ_t g_t·∂ℓ_t/∂W needs the incoming per-token gradients g_t.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, soft_rows, vocab_size, chunk_tokens):
        """`soft_rows`: the divergence of a chunk's rows to the teacher (`divergence_rows`), or None."""
        num_tokens = hidden.shape[0]
        ce = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        soft = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        for start, logits in _head_chunks(hidden, weight, bias, vocab_size, chunk_tokens):
            rows = slice(start, start + logits.shape[0])
            if targets is not None:
                ce[rows] = cross_entropy_chunk(logits, targets[rows])[0]
            if soft_rows is not None:
                # A divergence overwrites its inputs: after CE, the chunk's logits are spent.
                soft[rows] = soft_rows(logits, rows, None)[0]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.soft_rows = soft_rows
        ctx.vocab_size, ctx.chunk_tokens = vocab_size, chunk_tokens
        return ce, soft

    @staticmethod
    def backward(ctx, grad_ce, grad_soft):
        hidden, weight, bias, targets = ctx.saved_tensors
        vocab = ctx.vocab_size
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        w = _gemm_operand(weight[:vocab])
        for start, logits in _head_chunks(hidden, weight, bias, vocab, ctx.chunk_tokens):
            rows = slice(start, start + logits.shape[0])
            grad_logits = torch.zeros_like(logits)
            if targets is not None:
                grad_logits += cross_entropy_chunk(logits, targets[rows])[1] * grad_ce[rows, None]
            if ctx.soft_rows is not None:
                grad_logits += ctx.soft_rows(logits, rows, None)[1] * grad_soft[rows, None]
            # The gradient's GEMMs in the weight's dtype (bf16: the logits' gradient rounded to bf16, as
            # backpropagating through a bf16 LM head does), accumulated and returned in fp32.
            g = grad_logits.to(w.dtype)
            grad_hidden[rows] = _matmul_fp32(g, w).to(hidden.dtype)
            grad_weight[:vocab] += _matmul_fp32(g.T, hidden[rows].to(w.dtype))
            if grad_bias is not None:
                grad_bias[:vocab] += grad_logits.sum(0)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None, None


def _head_chunks(hidden, weight, bias, vocab_size, chunk_tokens):
    """fp32 logits of each chunk of `hidden`, multiplied in the weight's dtype (bf16 on a GPU run)."""
    w = _gemm_operand(weight[:vocab_size])
    chunk_tokens = chunk_rows(chunk_tokens, vocab_size)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = _matmul_fp32(hidden[start : start + chunk_tokens].to(w.dtype), w.T)
        if bias is not None:
            logits = logits + bias[:vocab_size].float()
        yield start, logits


def _gemm_operand(weight: torch.Tensor) -> torch.Tensor:
    """The LM head's weight as the fused head multiplies it: bf16 (or fp16) as it is, where tensor
    cores run ~15x faster than fp32 and accumulate in fp32; anything else in fp32."""
    return weight if weight.dtype in (torch.bfloat16, torch.float16) else weight.float()


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. For bf16 operands on a GPU, cuBLAS accumulates in fp32 and writes fp32
    (`out_dtype`), so only the inputs are rounded; elsewhere (a CPU) the product is rounded to bf16
    first, as a bf16 LM head's logits are."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _fp32_output_gemm(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_FP32_OUTPUT_GEMM: dict[torch.device, bool] = {}


def _fp32_output_gemm(device: torch.device) -> bool:
    """Whether `torch.mm(..., out_dtype=torch.float32)` runs on `device` (a recent PyTorch on CUDA)."""
    if device not in _FP32_OUTPUT_GEMM:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            _FP32_OUTPUT_GEMM[device] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUTPUT_GEMM[device] = False
    return _FP32_OUTPUT_GEMM[device]


def fused_head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    targets: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | SparseTeacher | None = None,
    divergence: Divergence = FORWARD_KL_T1,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    token_weights: torch.Tensor | None = None,
    sequences: Sequences | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(CE [B], token divergence [B]) per sequence, as `token_ce` and `divergence_per_sequence` on
    logits = hidden @ weight.T + bias, without building those logits. hidden [B,S,H] (the LM head's
    input), weight [V,H], mask [B,S]; CE needs `targets` [B,S], the divergence `teacher_logits`
    [B,S,Vt] or a SparseTeacher (the teacher cache's); each is None when its input is. `token_weights`
    [B,S]: CE as `token_ce` with them."""
    seqs = Sequences.of(mask, sequences)
    vocab = vocab_size or weight.shape[0]
    index = selected(mask)
    sel_targets = targets.flatten()[index] if targets is not None else None
    soft_rows = None
    if isinstance(teacher_logits, SparseTeacher):
        soft_rows = divergence_rows(teacher_logits, divergence, vocab, by_position=False)
    elif teacher_logits is not None:
        selected_teacher = teacher_logits.detach().flatten(0, 1)[index]
        soft_rows = divergence_rows(selected_teacher, divergence, vocab, by_position=False)
    ce, soft = _FusedHeadLosses.apply(
        hidden.flatten(0, 1)[index],
        weight,
        bias,
        sel_targets,
        soft_rows,
        vocab,
        chunk_tokens,
    )
    ce = reduce_per_sequence(ce, index, seqs, token_weights) if targets is not None else None
    soft = seqs.mean_selected(soft, index) if teacher_logits is not None else None
    return ce, soft
