"""The teacher cache's sparse teacher (`SparseTeacher`: top-k and a tail bucket), the divergence
against it, and CE with that divergence in one pass over the student's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vkd_ds.losses.chunks import chunk_rows
from vkd_ds.losses.divergences import DIVERGENCES, Divergence
from vkd_ds.sequences import Sequences, selected

# A stored log-probability or tail mass at or below this is taken as zero mass: the cache clamps its
# tail logs here, so that 0·log 0 never meets a -inf (exp(-1e4) is 0 in every float type).
LOG_ZERO = -1.0e4


@dataclass
class SparseTeacher:
    """The teacher's distribution at the selected positions (in `mask`'s row-major order), as the teacher
    cache stores it: its top-k token ids, their log-probabilities under softmax(z_T/T) and the log of
    the mass outside them (the tail bucket). k = V has no tail: the distribution is whole."""

    ids: torch.Tensor  # [N, k] int64, the teacher's top-k tokens, most probable first
    logp: torch.Tensor  # [N, k] fp32 at temperature `temperature`
    log_tail: torch.Tensor  # [N] fp32, log(1 − Σ_k p), LOG_ZERO for no mass
    temperature: float

    def __len__(self) -> int:
        return self.ids.shape[0]


def sparse_chunk(student: torch.Tensor, teacher: SparseTeacher, rows: slice, d: Divergence):
    """T²·D between the bucketed distributions — the teacher's top-k tokens one bucket each, every
    other token in one tail bucket — and its gradient to the student's logits (fp32 [chunk, V], an
    overwritable copy). D is any of DIVERGENCES, applied to the k+1 buckets at T = 1 (their log-
    probabilities are already at T). A bucketed divergence is at most the dense one (data
    processing) and equals it at k = V, where there is no tail bucket.

    Gradient: with g = ∂D/∂u, u the student's bucket log-probabilities (Σ_b g_b = 0, a softmax's
    Jacobian), ∂(T²·D)/∂z_j = T·g_b(j)·q_j/Q_b(j): g_j itself for a top-k token, g_tail·q_j/q_tail
    for a tail token."""
    part = _sparse_parts(student, teacher, rows, d, shifted=False)
    grad = part.exp.mul_(part.tail_factor[:, None])  # the tail's gradient (0 on the top-k, zeroed there)
    grad.scatter_(1, teacher.ids[rows], part.top_grad)
    return part.loss, grad


@dataclass
class _SparseParts:
    loss: torch.Tensor  # [chunk] T²·D
    exp: torch.Tensor  # [chunk, V] exp(z/T − max), 0 on the teacher's top-k
    top_exp: torch.Tensor  # [chunk, k] its values on the top-k
    total: torch.Tensor  # [chunk] Σ_v exp(z/T − max): q_T = exp / total
    tail_factor: torch.Tensor  # [chunk] T·g_tail/Σ_tail exp: a tail token's gradient per unit of `exp`
    top_grad: torch.Tensor  # [chunk, k] T·g of the top-k tokens: their gradient


def _sparse_parts(z: torch.Tensor, teacher: SparseTeacher, rows: slice, d: Divergence, shifted: bool) -> _SparseParts:
    """The sparse divergence of a chunk, in parts that `sparse_chunk` and `_CachedTokenLosses` assemble
    into a gradient. `z`: fp32 [chunk, V] logits, overwritten in place (every [chunk, V] step is in
    place: memory-bound passes, no second buffer); `shifted`: z already has its row maximum at 0."""
    t = d.temperature
    if not math.isclose(t, teacher.temperature, rel_tol=1e-6):
        raise ValueError(f"the cached teacher is at T={teacher.temperature}, the divergence at T={t}")
    ids = teacher.ids[rows]
    k, vocab = ids.shape[1], z.shape[1]
    if t != 1.0:
        z = z.div_(t)
    if not shifted:
        z = z.sub_(z.max(dim=-1, keepdim=True).values)  # exp cannot overflow
    top = z.gather(1, ids)
    e = z.exp_()
    total = e.sum(-1)
    log_total = total.log()
    u_student = top - log_total[:, None]  # log q of the top-k, from the logits (exact even where q underflows)
    u_teacher = teacher.logp[rows].float()
    top_exp = e.gather(1, ids)
    e.scatter_(1, ids, 0.0)
    tail = None
    if k < vocab:
        tail = e.sum(-1)
        log_tail = (tail.log() - log_total).clamp_(min=LOG_ZERO)
        u_student = torch.cat([u_student, log_tail[:, None]], dim=1)
        u_teacher = torch.cat([u_teacher, teacher.log_tail[rows].float()[:, None]], dim=1)
    loss, g = DIVERGENCES[d.kind](u_student, u_teacher, replace(d, temperature=1.0))
    if tail is None:
        factor = torch.zeros_like(total)
    else:  # no tail mass left in fp32: no gradient to spread over it
        factor = torch.where(tail > 0, g[:, k] * t / tail, torch.zeros_like(tail))
    return _SparseParts(loss * t**2, e, top_exp, total, factor, g[:, :k] * t)


class _CachedTokenLosses(torch.autograd.Function):
    """CE and sparse token KD of the same positions in one pass over the student's logits (a teacher
    cache's run with both terms): one fp32 copy of each chunk serves both, and backward writes
    their combined gradient into one tensor (no second [tokens, V] gradient for autograd to add).

    Keeps exp(z − max) and, at T ≠ 1, exp((z − max)/T) in the logits' dtype for backward, unnormalized
    (the normalizations fold into per-row factors). With fp32 logits each chunk is worked on in place
    in its rows of those buffers, so nothing is copied out at the end."""

    @staticmethod
    def forward(ctx, logits, flat_index, targets, teacher, divergence, vocab_size, chunk_tokens):
        flat = logits.flatten(0, 1)[:, :vocab_size]
        n = flat_index.numel()
        t = divergence.temperature
        step = chunk_rows(chunk_tokens, vocab_size)
        f32 = {"dtype": torch.float32, "device": logits.device}
        ce, soft, inv_total1, tail_factor = (torch.empty(n, **f32) for _ in range(4))
        top_grad = torch.empty((n, teacher.ids.shape[1]), **f32)
        keep = logits.requires_grad
        e1 = torch.empty((n, vocab_size), dtype=logits.dtype, device=logits.device) if keep else None
        e_t = (e1 if t == 1.0 else torch.empty_like(e1)) if keep else None
        in_place = keep and logits.dtype == torch.float32
        for start in range(0, n, step):
            sel = flat_index[start : start + step]
            rows = slice(start, start + sel.numel())
            if in_place:  # the chunk lives where exp((z − max)/T) is kept
                z = torch.index_select(flat, 0, sel, out=e_t[rows])
            else:
                z = flat.index_select(0, sel).float()
            z.sub_(z.max(dim=-1, keepdim=True).values)
            target_z = z.gather(1, targets[sel][:, None]).squeeze(1)
            if t != 1.0:  # CE's softmax at T = 1 before the sparse part overwrites z
                if keep and e1.dtype == torch.float32:
                    total1 = torch.exp(z, out=e1[rows]).sum(-1)
                else:  # the sum of the fp32 exponentials, not of their rounded copies
                    exp1 = z.exp()
                    total1 = exp1.sum(-1)
                    if keep:
                        e1[rows] = exp1
                    del exp1
                ce[rows] = total1.log() - target_z
                inv_total1[rows] = total1.reciprocal()
            part = _sparse_parts(z, teacher, rows, divergence, shifted=True)
            soft[rows] = part.loss
            if t == 1.0:
                ce[rows] = part.total.log() - target_z
                inv_total1[rows] = part.total.reciprocal()
            top_grad[rows] = part.top_grad
            tail_factor[rows] = part.tail_factor  # per unit of exp((z − max)/T)
            if keep:
                part.exp.scatter_(1, teacher.ids[rows], part.top_exp)  # the top-k back: exp((z − max)/T)
                if not in_place:
                    e_t[rows] = part.exp
        ctx.save_for_backward(flat_index, targets, e1, e_t, inv_total1, top_grad, tail_factor)
        ctx.ids = teacher.ids
        ctx.shape, ctx.vocab_size, ctx.chunk = logits.shape, vocab_size, step
        return ce, soft

    @staticmethod
    def backward(ctx, grad_ce, grad_soft):
        flat_index, targets, e1, e_t, inv_total1, top_grad, tail_factor = ctx.saved_tensors
        shape, vocab = ctx.shape, ctx.vocab_size
        whole = flat_index.numel() == shape[0] * shape[1] and vocab == shape[2]
        out = e1 if whole else torch.zeros((shape[0] * shape[1], shape[2]), dtype=e1.dtype, device=e1.device)
        for start in range(0, flat_index.numel(), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            ce_scale = grad_ce[rows].float() * inv_total1[rows]  # CE's gradient per unit of exp(z − max)
            b = grad_soft[rows].float()
            tail_scale = b * tail_factor[rows]
            ids = ctx.ids[rows]
            grad = e1[rows].float()
            top_e1 = grad.gather(1, ids)
            if e_t is e1:  # T = 1: one exponential serves both terms
                grad.mul_((ce_scale + tail_scale)[:, None])
            else:
                grad.mul_(ce_scale[:, None]).add_(e_t[rows].float().mul_(tail_scale[:, None]))
            # The top-k: CE's share and the sparse term's own gradient (the tail factor is not theirs).
            grad.scatter_(1, ids, ce_scale[:, None] * top_e1 + b[:, None] * top_grad[rows])
            sel_targets = targets[flat_index[rows]]
            grad[torch.arange(grad.shape[0], device=grad.device), sel_targets] -= grad_ce[rows].float()
            if whole:
                out[rows] = grad
            else:
                out[flat_index[rows], :vocab] = grad.to(out.dtype)
        return out.view(shape), None, None, None, None, None, None


def cached_token_losses(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: SparseTeacher,
    mask: torch.Tensor,
    divergence: Divergence,
    vocab_size: int,
    chunk_tokens: int = 1024,
    sequences: Sequences | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE [B], sparse token divergence [B]) per sequence, as `token_ce` and `divergence_per_sequence`
    with a SparseTeacher give them, in one pass over the student's logits (_CachedTokenLosses)."""
    seqs = Sequences.of(mask, sequences)
    flat_index = selected(mask)
    if len(teacher) != flat_index.numel():
        raise ValueError(f"the sparse teacher has {len(teacher)} rows for {flat_index.numel()} valid positions")
    ce, soft = _CachedTokenLosses.apply(
        student_logits, flat_index, targets.flatten(), teacher, divergence, vocab_size, chunk_tokens
    )
    return seqs.mean_selected(ce, flat_index), seqs.mean_selected(soft, flat_index)
