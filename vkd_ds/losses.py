"""Loss terms of SPEC §2 as pure functions of tensors (no collectives, no config).

Shapes: B sequences, S positions, V vocabulary. `mask[b, t]` marks the
positions whose prediction (of token t+1) counts. Every public term returns a
per-sequence value `[B]`: the mean over that sequence's valid positions, 0
for a sequence with none. The global reduction over the batch takes the
global weight sum as an argument (see `weighted_batch_loss`).

The per-token terms run over the vocabulary in token chunks, in fp32 per
chunk, and keep their gradient in the logits' dtype, so no fp32
`[tokens, vocab]` tensor of either model is ever materialized.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vkd_ds.sequences import HOST_SHIFTED, Sequences, next_token, selected

# `loss.chunk_tokens=auto` (plan_chunk_rows). On a CPU each fp32 [rows, vocab] buffer of a chunk stays
# at or under 16 MiB, well below glibc's largest mmap threshold (32 MiB, which vkd-ds fixes there,
# vkd_ds/malloc.py): such blocks stay in the heap and are reused chunk after chunk, where larger ones
# are mapped and page-faulted afresh each time (bench/soft_kd_memory.py --vocab 32768: 7.6 s -> 2.9 s;
# bench/chunk_tokens.py measures the choice against fixed sizes). On a GPU there is no
# such cliff, and every chunk costs a few dozen kernel launches: 512 MiB buffers keep a 152k
# vocabulary at 880 rows a chunk instead of 24 (tests/test_losses.py).
CPU_CHUNK_BYTES = 16 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20
# A chunk's working set is at most this share of the memory free when training starts.
CHUNK_MEMORY_SHARE = 0.125


def chunk_rows(chunk_tokens: int, vocab_size: int) -> int:
    """Rows per chunk: `loss.chunk_tokens`, resolved (an `auto` is planned once, at start: Objective.planned)."""
    if chunk_tokens is None:
        raise ValueError("loss.chunk_tokens=auto was never planned (Objective.planned)")
    return max(1, int(chunk_tokens))


def chunk_row_bytes(vocab_size: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes one row of a chunk needs at its peak: the row gathered in the logits' dtype, three fp32
    [vocab] buffers (its fp32 copy, the teacher's, one temporary; backward's gradient replaces one)
    and, with the fused LM head, its hidden state in fp32."""
    return vocab_size * (torch.empty((), dtype=dtype).element_size() + 3 * 4) + 4 * hidden


def plan_chunk_rows(
    vocab_size: int, hidden: int, dtype: torch.dtype, on_gpu: bool, free_bytes: int, fused: bool = False
) -> int:
    """`loss.chunk_tokens=auto`: the rows of a chunk, from the vocabulary, the hidden width, the logits'
    dtype, the device and the memory free at start. As many rows as keep one fp32 [rows, vocab]
    buffer within the device's chunk size (CPU_CHUNK_BYTES, GPU_CHUNK_BYTES) and the whole chunk
    within CHUNK_MEMORY_SHARE of the free memory; a multiple of 8 when over 8.

    `fused` (loss.fused_head): each chunk also multiplies by the whole [vocab, hidden] LM head, which
    a chunk of few rows spends its time reading. Where the CPU cap leaves fewer than
    FUSED_MIN_ROWS rows (vocabularies above 64k), the chunk is FUSED_ROWS rows instead, mapped
    afresh each time: at 151,936 that ran 1.6x faster than 24 rows (bench/chunk_tokens.py)."""
    cap = (GPU_CHUNK_BYTES if on_gpu else CPU_CHUNK_BYTES) // (4 * vocab_size)
    if fused and cap < FUSED_MIN_ROWS:
        cap = FUSED_ROWS
    budget = int(free_bytes * CHUNK_MEMORY_SHARE) // chunk_row_bytes(vocab_size, hidden, dtype)
    rows = max(1, min(cap, budget))
    return rows - rows % 8 if rows > 8 else rows


FUSED_MIN_ROWS = 64
FUSED_ROWS = 512


@dataclass(frozen=True)
class Divergence:
    """The token-level divergence D(p, q) of the soft term (`loss.divergence`) with its parameters:
    p = softmax(z_T/T), q = softmax(z_S/T), and every kind is multiplied by T²."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd: m = β·p + (1−β)·q
    alpha: float = 0.1  # skew_*: the other distribution's share of the mixture

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.kind!r}; one of {', '.join(DIVERGENCES)}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"jsd's beta must be in (0, 1), got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"the skew divergences' alpha must be in [0, 1), got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"the temperature must be positive, got {self.temperature}")


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """(log q, log p) at temperature T, computed in place of the (overwritable) fp32 logit copies."""
    return F.log_softmax(student.div_(temperature), dim=-1), F.log_softmax(teacher.div_(temperature), dim=-1)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, without a [chunk, vocab] product buffer."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _through_softmax(q: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """d(T²·D)/dz_S from g = ∂D/∂q (up to a per-row constant): T·q·(g − Σ_v q·g), in place of `g`."""
    return g.sub_(_row_dot(q, g)[:, None]).mul_(q).mul_(temperature)


def _mixture_log(log_a: torch.Tensor, share_a: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(share_a·a + (1 − share_a)·b) from log a and log b (share_a may be 0)."""
    if share_a == 0.0:
        return log_b.clone()
    return torch.logaddexp(log_a + math.log(share_a), log_b + math.log1p(-share_a))


def _forward_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """KL(p || q); at its peak a chunk holds three [chunk, vocab] fp32 buffers."""
    t = d.temperature
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    p = log_p.exp()
    log_ratio = log_p.sub_(log_q)
    loss = _row_dot(p, log_ratio) * t**2
    del log_ratio
    # d/dz_S [T² KL] = T² (q - p) / T
    grad = log_q.exp_().sub_(p).mul_(t)
    return loss, grad


def _reverse_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """KL(q || p): ∂/∂q_v = log q_v − log p_v (+1, which the softmax's Jacobian removes)."""
    t = d.temperature
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    q = log_q.exp()
    g = log_q.sub_(log_p)
    del log_p
    loss = _row_dot(q, g) * t**2
    return loss, _through_softmax(q, g, t)


def _jsd_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """β·KL(p || m) + (1−β)·KL(q || m), m = β·p + (1−β)·q: ∂/∂q_v = (1−β)·(log q_v − log m_v)."""
    t, beta = d.temperature, d.beta
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    log_m = _mixture_log(log_p, beta, log_q)
    p, q = log_p.exp(), log_q.exp()
    to_p, to_q = log_p.sub_(log_m), log_q.sub_(log_m)
    del log_m
    loss = (beta * _row_dot(p, to_p) + (1 - beta) * _row_dot(q, to_q)) * t**2
    del p, to_p
    return loss, _through_softmax(q, to_q.mul_(1 - beta), t)


def _tvd_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """½·Σ|p − q|: ∂/∂q_v = ½·sign(q_v − p_v) (0 where they are equal, as autograd's abs)."""
    t = d.temperature
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    q = log_q.exp_()
    diff = log_p.exp_().neg_().add_(q)  # q − p
    loss = diff.abs().sum(-1).mul_(0.5 * t**2)
    return loss, _through_softmax(q, diff.sign_().mul_(0.5), t)


def _skew_forward_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """KL(p || m), m = α·p + (1−α)·q (DistiLLM's skew KL): ∂/∂q_v = −(1−α)·p_v / m_v."""
    t, alpha = d.temperature, d.alpha
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    log_m = _mixture_log(log_p, alpha, log_q)
    q = log_q.exp_()
    p = log_p.exp()
    log_ratio = log_p.sub_(log_m)  # log p − log m
    loss = _row_dot(p, log_ratio) * t**2
    del p, log_m
    g = log_ratio.exp_().mul_(-(1 - alpha))  # −(1−α)·p/m
    return loss, _through_softmax(q, g, t)


def _skew_reverse_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, d: Divergence):
    """KL(q || m), m = (1−α)·p + α·q: ∂/∂q_v = log q_v − log m_v − α·q_v / m_v (+1)."""
    t, alpha = d.temperature, d.alpha
    log_q, log_p = _log_probs(student, teacher, t)
    del student, teacher
    log_m = _mixture_log(log_q, alpha, log_p)
    del log_p
    q = log_q.exp()
    to_m = log_q.sub_(log_m)  # log q − log m
    del log_m
    loss = _row_dot(q, to_m) * t**2
    g = to_m.exp().mul_(-alpha).add_(to_m) if alpha > 0 else to_m  # log q − log m − α·q/m
    return loss, _through_softmax(q, g, t)


# The token-level KD term's divergences (`loss.divergence`), by name. Each maps fp32 [chunk, vocab]
# student and teacher logits (copies it may overwrite) and the Divergence to (T²·D per token,
# d(T²·D)/d(student logits)); the chunking, the masks, the fused LM head and the config's choices
# all come from here, so a new divergence is one function and one entry.
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, Divergence], tuple[torch.Tensor, torch.Tensor]]] = {
    "forward_kl": _forward_kl_chunk,
    "reverse_kl": _reverse_kl_chunk,
    "jsd": _jsd_chunk,
    "tvd": _tvd_chunk,
    "skew_forward_kl": _skew_forward_kl_chunk,
    "skew_reverse_kl": _skew_reverse_kl_chunk,
}

FORWARD_KL_T1 = Divergence()  # what eval's kl_teacher measures


def _cross_entropy_chunk(student: torch.Tensor, targets: torch.Tensor):
    log_p = F.log_softmax(student, dim=-1)
    loss = -log_p.gather(-1, targets[:, None]).squeeze(-1)
    grad = log_p.exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return loss, grad


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


def _sparse_chunk(student: torch.Tensor, teacher: SparseTeacher, rows: slice, d: Divergence):
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
    """The sparse divergence of a chunk, in parts that `_sparse_chunk` and `_CachedTokenLosses` assemble
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


RowsLoss = Callable[[torch.Tensor, slice, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _ce_rows(targets: torch.Tensor) -> RowsLoss:
    """CE of a chunk against the target ids, `targets` indexed by flat position."""
    return lambda student, rows, sel: _cross_entropy_chunk(student, targets[sel])


def _teacher_rows(teacher, divergence: Divergence, vocab_size: int, by_position: bool) -> RowsLoss:
    """The divergence of a chunk to the teacher: `teacher` a SparseTeacher (rows in selected order), or
    logits indexed by flat position (`by_position`) or already selected ([N, Vt], rows in order)."""
    if isinstance(teacher, SparseTeacher):
        return lambda student, rows, sel: _sparse_chunk(student, teacher, rows, divergence)

    def rows_loss(student, rows, sel):
        # A divergence overwrites its inputs: the teacher's rows are a copy (they serve backward too).
        teacher_rows = teacher[sel if by_position else rows, :vocab_size].to(torch.float32, copy=True)
        return DIVERGENCES[divergence.kind](student, teacher_rows, divergence)

    return rows_loss


class _ChunkedTokenLoss(torch.autograd.Function):
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
        the selected positions (`_ce_rows`, `_teacher_rows`). `into`: a [positions, width] tensor of
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
        rows_loss = _teacher_rows(teacher, divergence, vocab, by_position=False)
    else:
        vocab = vocab_size or min(student_logits.shape[-1], teacher.shape[-1])
        flat_teacher = teacher.detach().flatten(0, 1)
        rows_loss = _teacher_rows(flat_teacher, divergence, vocab, by_position=True)
        into = flat_teacher if overwrite_teacher and teacher.is_contiguous() else None
        per_token = _ChunkedTokenLoss.apply(student_logits, flat_index, rows_loss, vocab, chunk_tokens, into)
        return seqs.mean_selected(per_token, flat_index)
    per_token = _ChunkedTokenLoss.apply(student_logits, flat_index, rows_loss, vocab, chunk_tokens)
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
    per_token = _ChunkedTokenLoss.apply(student_logits, flat_index, _ce_rows(targets.flatten()), vocab, chunk_tokens)
    return _reduce_per_sequence(per_token, flat_index, Sequences.of(mask, sequences), token_weights)


def _reduce_per_sequence(per_token, flat_index, seqs: Sequences, token_weights=None):
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
    nll = _ChunkedTokenLoss.apply(logits.detach(), flat_index, _ce_rows(targets.flatten()), vocab, chunk_tokens)
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
    weights: A_t = R − b for a sequence reward, which gives SPEC §2's −(R − b)·∇ log p_S(y|x));
    teacher_logprob [B]: mean log p_T of the sample's tokens, a constant."""
    return (-teacher_logprob).detach().to(weighted_nll.dtype) + weighted_nll - weighted_nll.detach()


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


def valence_mse(
    v_student: torch.Tensor, v_teacher: torch.Tensor, mask: torch.Tensor, sequences: Sequences | None = None
) -> torch.Tensor:
    """L_val per sequence: MSE(v_S, v_T) over valid positions and all k steps.

    v_student, v_teacher [B,S,k], mask [B,S] -> [B] fp32.
    """
    per_position = (v_student.float() - v_teacher.detach().float()).pow(2).mean(-1)
    return Sequences.of(mask, sequences).mean(per_position, mask)


def feature_kd(
    student_hiddens: list[torch.Tensor],
    teacher_hiddens: list[torch.Tensor],
    projectors: list,
    mask: torch.Tensor,
    sequences: Sequences | None = None,
) -> torch.Tensor:
    """L_feat per sequence: Σ_l MSE(P_l(h_S^(l)), h_T^(m(l))) over the mapped layer pairs.

    Lists of [B,S,Hs] and [B,S,Ht] tensors (one per pair), `projectors[l]` a module mapping Hs -> Ht or
    None (identity, widths equal); the MSE averages over hidden units and valid positions -> [B] fp32.
    """
    seqs = Sequences.of(mask, sequences)
    total = torch.zeros(seqs.count, dtype=torch.float32, device=mask.device)
    for h_s, h_t, proj in zip(student_hiddens, teacher_hiddens, projectors, strict=True):
        projected = proj(h_s) if proj is not None else h_s
        per_position = (projected.float() - h_t.detach().float()).pow(2).mean(-1)
        total = total + seqs.mean(per_position, mask)
    return total


def attention_kd(
    student_attn: list[torch.Tensor],
    teacher_attn: list[torch.Tensor],
    mask: torch.Tensor,
    sequences: Sequences | None = None,
) -> torch.Tensor:
    """The attention-map part of L_feat per sequence: Σ over mapped pairs of the mean over valid query
    positions of Σ_keys (A_S − A_T)², A the head-averaged attention probabilities [B,S,S].

    Summing over keys (not averaging) keeps the value independent of how far a batch is padded, and of
    packing: a packed row's block-diagonal attention gives every other document's keys 0 in both maps.
    """
    seqs = Sequences.of(mask, sequences)
    total = torch.zeros(seqs.count, dtype=torch.float32, device=mask.device)
    for a_s, a_t in zip(student_attn, teacher_attn, strict=True):
        per_query = (a_s.float() - a_t.detach().float()).pow(2).sum(-1)
        total = total + seqs.mean(per_query, mask)
    return total


def sequence_features(hidden: torch.Tensor, mask: torch.Tensor, sequences: Sequences | None = None) -> torch.Tensor:
    """[B,S,H] -> [B,H]: mean of the hidden states over each sequence's valid positions."""
    return Sequences.of(mask, sequences).mean(hidden, mask)


def info_nce(student_feats: torch.Tensor, teacher_feats: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The contrastive part of L_reg per sequence [B]: InfoNCE of student sequence i against the teacher
    features of every sequence in the batch, the teacher's own sequence i being the positive.
    Cosine similarities divided by `temperature`."""
    s = F.normalize(student_feats.float(), dim=-1)
    t = F.normalize(teacher_feats.detach().float(), dim=-1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device), reduction="none")


class _FusedHeadLosses(torch.autograd.Function):
    """Per-token CE and soft KD straight from the last hidden states and the LM head's weight.

    Forward and backward both rebuild each chunk's logits from `hidden @ weight.T`, so the
    student's `[tokens, vocab]` logits never exist, in any dtype: memory is O(chunk × vocab).
    Backward recomputes the chunk (one extra matmul) because the weight's gradient
    Σ_t g_t·∂ℓ_t/∂W needs the incoming per-token gradients g_t.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, soft_rows, vocab_size, chunk_tokens):
        """`soft_rows`: the divergence of a chunk's rows to the teacher (`_teacher_rows`), or None."""
        num_tokens = hidden.shape[0]
        ce = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        soft = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        for start, logits in _head_chunks(hidden, weight, bias, vocab_size, chunk_tokens):
            rows = slice(start, start + logits.shape[0])
            if targets is not None:
                ce[rows] = _cross_entropy_chunk(logits, targets[rows])[0]
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
                grad_logits += _cross_entropy_chunk(logits, targets[rows])[1] * grad_ce[rows, None]
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
        soft_rows = _teacher_rows(teacher_logits, divergence, vocab, by_position=False)
    elif teacher_logits is not None:
        selected_teacher = teacher_logits.detach().flatten(0, 1)[index]
        soft_rows = _teacher_rows(selected_teacher, divergence, vocab, by_position=False)
    ce, soft = _FusedHeadLosses.apply(
        hidden.flatten(0, 1)[index],
        weight,
        bias,
        sel_targets,
        soft_rows,
        vocab,
        chunk_tokens,
    )
    ce = _reduce_per_sequence(ce, index, seqs, token_weights) if targets is not None else None
    soft = seqs.mean_selected(soft, index) if teacher_logits is not None else None
    return ce, soft
