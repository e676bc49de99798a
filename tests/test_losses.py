"""Chunked CE and soft KD against the dense formulas of docs/objective.md: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from vkd_ds.losses import (
    combine_terms,
    divergence_per_sequence,
    shift_for_next_token,
    token_ce,
    token_divergence,
    weighted_batch_loss,
)


def dense_soft_kd(student, teacher, mask, temperature, vocab):
    """docs/objective.md: per token KL(softmax(z_T/T) || softmax(z_S/T))·T², averaged over a sequence's valid tokens."""
    return dense_token_divergence(student, teacher, mask, "forward_kl", temperature, vocab)


def dense_ce(student, targets, mask, vocab):
    out = []
    for b in range(mask.shape[0]):
        m = mask[b]
        out.append(F.cross_entropy(student[b, m, :vocab].double(), targets[b, m]) if m.any() else student.sum() * 0)
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_kd_equals_dense(logits, chunk, temperature):
    student, teacher, mask, vocab = logits
    got = token_divergence(student, teacher, mask, "forward_kl", temperature, vocab_size=vocab, chunk_tokens=chunk)
    want = dense_soft_kd(student, teacher, mask, temperature, vocab)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got[1] == 0
    upstream = torch.randn(mask.shape[0])
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), student)
    (grad_want,) = torch.autograd.grad((want * upstream.double()).sum(), student)
    torch.testing.assert_close(grad_got, grad_want.float(), atol=1e-5, rtol=1e-5)
    assert grad_got[..., vocab:].abs().max() == 0  # padded vocabulary rows get no gradient


@pytest.mark.parametrize("chunk", [3, 1024])
def test_token_ce_equals_dense(logits, chunk):
    student, _, mask, vocab = logits
    targets = torch.randint(0, vocab, mask.shape)
    got = token_ce(student, targets, mask, vocab, chunk_tokens=chunk)
    want = dense_ce(student, targets, mask, vocab)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(mask.shape[0])
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), student)
    (grad_want,) = torch.autograd.grad((want * upstream.double()).sum(), student)
    torch.testing.assert_close(grad_got, grad_want.float(), atol=1e-5, rtol=1e-5)


def test_soft_kd_is_zero_for_identical_logits(logits):
    student, _, mask, vocab = logits
    got = token_divergence(student, student.detach().clone(), mask, temperature=4.0, vocab_size=vocab)
    assert got.abs().max() < 1e-5


def test_bf16_logits_keep_bf16_gradient(logits):
    student, teacher, mask, vocab = logits
    student16 = student.detach().bfloat16().requires_grad_()
    got = token_divergence(student16, teacher.bfloat16(), mask, temperature=4.0, vocab_size=vocab)
    assert got.dtype == torch.float32
    (grad,) = torch.autograd.grad(got.sum(), student16)
    assert grad.dtype == torch.bfloat16
    want = dense_soft_kd(student16.float(), teacher.bfloat16().float(), mask, 4.0, vocab)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("full", [True, False], ids=["every-position", "masked"])
@pytest.mark.parametrize("term", ["soft", "ce"])
def test_bf16_backward_rounds_the_gradient_once(logits, full, term):
    """In bf16 the stored per-token gradient is scaled by the upstream gradient in fp32 and rounded
    once; rounding the upstream gradient to bf16 first, then the product, loses up to a bf16 ulp."""
    student, teacher, mask, vocab = logits
    if full:
        mask = torch.ones_like(mask)
        student = student[..., :vocab]
    student16 = student.detach().bfloat16().requires_grad_()
    teacher16 = teacher.bfloat16()
    targets = torch.randint(0, vocab, mask.shape)
    if term == "soft":
        per_sequence = token_divergence(student16, teacher16, mask, temperature=2.0, vocab_size=vocab)
    else:
        per_sequence = token_ce(student16, targets, mask, vocab)
    # Per-sequence weights that bf16 cannot hold exactly, as the valence weights are.
    weights = torch.tensor([1 / 3, 0.7, 1 / 7, 2 / 9])
    (got,) = torch.autograd.grad((per_sequence * weights).sum(), student16)
    # The reference: the same per-token gradient (fp32 math, stored once in bf16), times the fp32
    # upstream gradient weight_b / count_b, rounded to bf16 once.
    count = mask.sum(1).clamp(min=1).float()
    upstream = (weights / count)[:, None].expand(mask.shape)
    p_student = F.softmax(student16.float()[..., :vocab] / (2.0 if term == "soft" else 1.0), -1)
    if term == "soft":
        per_token_grad = (p_student - F.softmax(teacher16.float()[..., :vocab] / 2.0, -1)) * 2.0
    else:
        per_token_grad = p_student - F.one_hot(targets, vocab).float()
    want = torch.zeros_like(got)
    rounded_once = (per_token_grad.bfloat16().float() * upstream[..., None]).bfloat16()
    want[..., :vocab] = torch.where(mask[..., None], rounded_once, torch.zeros_like(rounded_once))
    # Softmax libraries differ in the last fp32 bit, which can flip a bf16 rounding: allow one
    # bf16 ulp on a few elements, where rounding twice is off on many.
    differs = (got.float() - want.float()).abs() > 0
    assert differs.float().mean() < 0.01, float(differs.float().mean())
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)


def test_shift_for_next_token():
    ids = torch.tensor([[5, 6, 7, 8]])
    loss_mask = torch.tensor([[False, False, True, True]])  # a prompt of 2 tokens, then the completion
    targets, mask = shift_for_next_token(ids, loss_mask)
    assert targets.tolist() == [[6, 7, 8, 0]]
    assert mask.tolist() == [[False, True, True, False]]


def test_weighted_global_reduction_splits_exactly():
    """Shares of two halves of a batch, each over the global weight sum, add up to the whole-batch loss."""
    torch.manual_seed(1)
    base, weights = torch.rand(8), torch.rand(8) + 0.5
    whole = weighted_batch_loss(base, weights, weights.sum())
    halves = sum(weighted_batch_loss(base[i : i + 4], weights[i : i + 4], weights.sum()) for i in (0, 4))
    torch.testing.assert_close(halves, whole)
    torch.testing.assert_close(whole, (weights * base).sum() / weights.sum())


def test_combine_terms_skips_zero_weights():
    terms = {"ce": torch.tensor([1.0, 2.0]), "soft": torch.tensor([3.0, 5.0])}
    got = combine_terms(terms, {"ce": 1.0, "soft": 0.5, "feat": 0.0})
    assert got.tolist() == [2.5, 4.5]


def test_auto_plans_smaller_chunks_for_larger_vocabularies_with_the_same_values():
    """`loss.chunk_tokens=auto` on a CPU: one fp32 [rows, vocab] buffer stays within 16 MiB (64 rows at
    vocabulary 65536), on a GPU within 512 MiB, and either within an eighth of the free memory; an
    integer is taken as it is. At 65536 the per-token values and gradients stay the dense formula's."""
    from vkd_ds.losses import chunk_row_bytes, chunk_rows, plan_chunk_rows

    plenty = 64 * 2**30
    assert plan_chunk_rows(8192, 256, torch.float32, False, plenty) == 512
    assert plan_chunk_rows(65536, 256, torch.float32, False, plenty) == 64
    assert plan_chunk_rows(151936, 2048, torch.float32, False, plenty) == 24  # 27, to a multiple of 8
    assert plan_chunk_rows(151936, 2048, torch.bfloat16, True, plenty) == 880
    # Short of memory: an eighth of it, whatever the device allows.
    row = chunk_row_bytes(151936, 2048, torch.bfloat16)
    assert row == 151936 * 14 + 4 * 2048
    assert plan_chunk_rows(151936, 2048, torch.bfloat16, True, 8 * 100 * row) == 96
    assert plan_chunk_rows(10**9, 8, torch.float32, False, plenty) == 1
    # The fused head: where the CPU cap leaves under 64 rows, 512 (each chunk reads the whole head).
    assert plan_chunk_rows(151936, 256, torch.float32, False, plenty, fused=True) == 512
    assert plan_chunk_rows(32768, 256, torch.float32, False, plenty, fused=True) == 128
    assert chunk_rows(256, 65536) == 256 and chunk_rows(7, 8) == 7
    with pytest.raises(ValueError, match="never planned"):
        chunk_rows(None, 8)
    torch.manual_seed(1)
    batch, seq, vocab = 2, 70, 65536
    student = torch.randn(batch, seq, vocab, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab)
    targets = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    rows = plan_chunk_rows(vocab, 256, torch.float32, False, plenty)  # 140 positions: three chunks
    soft = token_divergence(student, teacher, mask, temperature=2.0, vocab_size=vocab, chunk_tokens=rows)
    ours = soft + token_ce(student, targets, mask, vocab, rows)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    dense = dense_soft_kd(student, teacher, mask, 2.0, vocab) + dense_ce(student, targets, mask, vocab)
    (dense_grad,) = torch.autograd.grad(dense.sum(), student)
    torch.testing.assert_close(ours.double(), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-9)


def test_a_divergence_is_one_entry_of_the_registry(monkeypatch):
    """token_divergence, the fused head and the settings' check all read losses.DIVERGENCES: registering a
    function there is all a new divergence needs (here: a 'half_forward_kl' = ½·forward KL)."""
    from vkd_ds import losses
    from vkd_ds.config import compose
    from vkd_ds.errors import VkdError
    from vkd_ds.settings import Settings

    def half_forward_kl(student, teacher, divergence):
        loss, grad = losses.DIVERGENCES["forward_kl"](student, teacher, divergence)
        return loss * 0.5, grad * 0.5

    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    required = ["teacher.path=/t", "data.train_path=/d", "loss.val=0", "weighting.lam=0", "gate.enabled=false"]
    with pytest.raises(VkdError, match="`loss.divergence` must be one of forward_kl"):
        Settings.from_config(compose([*required, "loss.divergence=half_forward_kl"]))
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(student, teacher, mask, "half_forward_kl", 2.0)
    monkeypatch.setitem(losses.DIVERGENCES, "half_forward_kl", half_forward_kl)
    Settings.from_config(compose([*required, "loss.divergence=half_forward_kl"]))
    full = token_divergence(student, teacher, mask, "forward_kl", 2.0, chunk_tokens=3)
    half = token_divergence(student, teacher, mask, "half_forward_kl", 2.0, chunk_tokens=3)
    torch.testing.assert_close(half, full * 0.5)
    (g_full,) = torch.autograd.grad(full.sum(), student)
    (g_half,) = torch.autograd.grad(half.sum(), student)
    torch.testing.assert_close(g_half, g_full * 0.5)


# ---- the divergence family (loss.divergence): each against a dense autograd formula --------------


def _kl(a, log_a, log_b):
    return (a * (log_a - log_b)).sum(-1)


def dense_divergence(kind, log_p, log_q, beta=0.5, alpha=0.1):
    """D(p, q) per row in float64 by autograd-friendly formulas, p the teacher's, q the student's."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return _kl(p, log_p, log_q)
    if kind == "reverse_kl":
        return _kl(q, log_q, log_p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, log_p, m.log()) + (1 - beta) * _kl(q, log_q, m.log())
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_forward_kl":
        return _kl(p, log_p, (alpha * p + (1 - alpha) * q).log())
    if kind == "skew_reverse_kl":
        return _kl(q, log_q, ((1 - alpha) * p + alpha * q).log())
    raise AssertionError(kind)


def dense_token_divergence(student, teacher, mask, kind, temperature, vocab, top_k=None, **params):
    """Per sequence; with `top_k`, between the bucketed distributions of a teacher cache: the teacher's
    top-k tokens one bucket each, the rest one tail bucket (none at top_k = vocab)."""
    out = []
    for b in range(mask.shape[0]):
        m = mask[b]
        if not m.any():
            out.append(student.sum() * 0)
            continue
        log_q = F.log_softmax(student[b, m, :vocab].double() / temperature, -1)
        log_p = F.log_softmax(teacher[b, m, :vocab].double() / temperature, -1)
        if top_k is not None:
            log_p, log_q = _bucketed(log_p, log_q, teacher[b, m, :vocab].topk(top_k, dim=-1).indices)
        out.append(dense_divergence(kind, log_p, log_q, **params).mean() * temperature**2)
    return torch.stack(out)


def _bucketed(log_p, log_q, ids):
    top_p, top_q = log_p.gather(1, ids), log_q.gather(1, ids)
    if ids.shape[1] == log_p.shape[1]:
        return top_p, top_q
    inside = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, ids, True)
    tail_p = torch.logsumexp(log_p.masked_fill(inside, float("-inf")), -1, keepdim=True)
    tail_q = torch.logsumexp(log_q.masked_fill(inside, float("-inf")), -1, keepdim=True)
    return torch.cat([top_p, tail_p], 1), torch.cat([top_q, tail_q], 1)


KINDS = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]


def test_every_registered_divergence_is_tested():
    from vkd_ds.losses import DIVERGENCES

    assert sorted(DIVERGENCES) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature, beta, alpha", [(1.0, 0.5, 0.1), (2.5, 0.3, 0.25)])
def test_each_divergence_equals_its_dense_formula(logits, kind, temperature, beta, alpha):
    """Value and gradient within 1e-5 of float64 autograd, with masked rows (one sequence without
    a valid position), a teacher vocabulary padded wider than the student's, T ≠ 1, chunked or not."""
    student, teacher, mask, vocab = logits
    want = dense_token_divergence(student, teacher, mask, kind, temperature, vocab, beta=beta, alpha=alpha)
    upstream = torch.randn(mask.shape[0])
    (grad_want,) = torch.autograd.grad((want * upstream.double()).sum(), student)
    for chunk in (1, 7, 1024):
        got = token_divergence(
            student, teacher, mask, kind, temperature, beta, alpha, vocab_size=vocab, chunk_tokens=chunk
        )
        assert got.dtype == torch.float32 and got[1] == 0
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        (grad_got,) = torch.autograd.grad((got * upstream).sum(), student)
        torch.testing.assert_close(grad_got, grad_want.float(), atol=1e-5, rtol=1e-5)
        assert grad_got[..., vocab:].abs().max() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_each_divergence_through_the_fused_head_equals_the_logits_path(kind, sparse):
    """Also against a teacher cache's top-5 + tail (a SparseTeacher) in place of the teacher's logits."""
    from vkd_ds.losses import Divergence, SparseTeacher, fused_head_losses
    from vkd_ds.teacher_cache import teacher_rows

    torch.manual_seed(3)
    batch, seq, width, vocab = 3, 6, 8, 19
    hidden = torch.randn(batch, seq, width, requires_grad=True)
    weight = torch.randn(vocab + 2, width, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab + 4) * 2
    mask = torch.rand(batch, seq) > 0.3
    mask[0] = False
    divergence = Divergence(kind, 1.7, 0.4, 0.2)
    if sparse:
        rows = teacher_rows(teacher, torch.zeros(mask.shape, dtype=torch.long), mask, vocab, 5, 1.7)
        teacher = SparseTeacher(rows["ids"], rows["logp"], rows["tail"], 1.7)
    _, fused = fused_head_losses(hidden, weight, None, mask, None, teacher, divergence, vocab, chunk_tokens=4)
    logits = hidden @ weight.T
    plain = divergence_per_sequence(logits, teacher, mask, divergence, vocab)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    upstream = torch.tensor([0.3, 1.1, 0.6])
    got = torch.autograd.grad((fused * upstream).sum(), [hidden, weight])
    want = torch.autograd.grad((plain * upstream).sum(), [hidden, weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_divergence_identities(logits):
    """jsd at β = 0.5 is symmetric in p and q; tvd is at most 1; each skew KL at α = 0 is the plain
    KL; every divergence of a distribution to itself is 0."""
    student, teacher, mask, vocab = logits
    student = student.detach()[..., :vocab]
    teacher = teacher[..., :vocab]
    jsd_pq = token_divergence(student, teacher, mask, "jsd", beta=0.5)
    jsd_qp = token_divergence(teacher, student, mask, "jsd", beta=0.5)
    torch.testing.assert_close(jsd_pq, jsd_qp, atol=1e-6, rtol=1e-5)
    far = torch.zeros_like(student)
    far[..., 0], teacher_far = 60.0, torch.zeros_like(student)
    teacher_far[..., 1] = 60.0
    tvd = token_divergence(far, teacher_far, mask, "tvd")
    assert tvd.max() <= 1.0 and tvd.max() > 0.999  # disjoint supports: the bound itself
    assert token_divergence(student, teacher, mask, "tvd", temperature=1.0).max() <= 1.0
    for skew, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        torch.testing.assert_close(
            token_divergence(student, teacher, mask, skew, 2.0, alpha=0.0),
            token_divergence(student, teacher, mask, plain, 2.0),
        )
    for kind in KINDS:
        assert token_divergence(student, student.clone(), mask, kind, 3.0).abs().max() < 1e-5, kind


@pytest.mark.parametrize(
    "kind, beta, alpha, message",
    [
        ("l2", 0.5, 0.1, "unknown divergence"),
        ("jsd", 1.0, 0.1, "beta"),
        ("jsd", 0.0, 0.1, "beta"),
        ("skew_forward_kl", 0.5, 1.0, "alpha"),
        ("skew_reverse_kl", 0.5, -0.1, "alpha"),
    ],
)
def test_bad_divergence_parameters_are_refused(logits, kind, beta, alpha, message):
    student, teacher, mask, _ = logits
    with pytest.raises(ValueError, match=message):
        token_divergence(student, teacher, mask, kind, beta=beta, alpha=alpha)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_bf16_fused_head_matches_the_fp32_one_within_bf16_rounding(sparse):
    """A bf16 LM head multiplies in bf16 (fp32 accumulation, fp32 logits and reductions): CE, the
    divergence and both gradients agree with the fp32 head to bf16's precision; the fp32 head itself
    is the logits path's (test above)."""
    from vkd_ds.losses import Divergence, SparseTeacher, fused_head_losses
    from vkd_ds.teacher_cache import teacher_rows

    torch.manual_seed(5)
    batch, seq, width, vocab = 3, 7, 32, 301
    hidden = torch.randn(batch, seq, width) / width**0.25
    weight = torch.randn(vocab, width) / width**0.25
    teacher = torch.randn(batch, seq, vocab) * 2
    mask = torch.rand(batch, seq) > 0.2
    targets = torch.randint(0, vocab, (batch, seq))
    divergence = Divergence("forward_kl", 2.0, 0.5, 0.1)
    if sparse:
        rows = teacher_rows(teacher, targets, mask, vocab, 8, 2.0)
        teacher = SparseTeacher(rows["ids"], rows["logp"], rows["tail"], 2.0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        ce, soft = fused_head_losses(h, w, None, mask, targets, teacher, divergence, vocab, chunk_tokens=5)
        grads = torch.autograd.grad((ce * 0.7 + soft * 1.3).sum(), [h, w])
        assert ce.dtype == soft.dtype == torch.float32  # fp32 reductions whatever the head's dtype
        assert grads[0].dtype == grads[1].dtype == dtype
        results[dtype] = (ce, soft, *(g.float() for g in grads))
    for got, want in zip(results[torch.bfloat16], results[torch.float32], strict=True):
        # bf16 keeps 8 bits of mantissa (relative 2^-8 = 0.4% per rounding of an input or a product).
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    # ... and it is bf16 arithmetic, not an fp32 copy: the results differ from the fp32 head's.
    assert not torch.equal(results[torch.bfloat16][0], results[torch.float32][0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_soft_term_may_store_its_gradient_in_the_teachers_logits(kind, dtype):
    """Training's soft term stores d loss/d logits in the teacher's logits, which nothing reads after
    it (`overwrite_teacher`): a [tokens, vocab] tensor fewer at the step's peak. Loss and gradient are
    bit for bit those of a separate store, with masked positions, a padded student width and a
    per-sequence upstream gradient; the teacher's tensor then holds the gradient."""
    from vkd_ds.losses import Divergence

    torch.manual_seed(7)
    batch, seq, vocab = 3, 9, 37
    student = (torch.randn(batch, seq, vocab + 3) * 2).to(dtype)  # a padded LM head
    teacher = (torch.randn(batch, seq, vocab + 3) * 2).to(dtype)
    mask = torch.rand(batch, seq) > 0.3
    mask[:, -1] = False  # the last position never has a target
    divergence = Divergence(kind, 2.0, 0.4, 0.2)
    upstream = torch.tensor([0.3, 1.7, 0.9])
    results = []
    for overwrite in (False, True):
        s = student.clone().requires_grad_(True)
        t = teacher.clone()
        loss = divergence_per_sequence(s, t, mask, divergence, vocab, 4, overwrite_teacher=overwrite)
        (grad,) = torch.autograd.grad((loss * upstream).sum(), [s])
        results.append((loss, grad, t))
    (loss_kept, grad_kept, teacher_kept), (loss_reused, grad_reused, teacher_reused) = results
    assert torch.equal(loss_reused, loss_kept) and torch.equal(grad_reused, grad_kept)
    assert torch.equal(teacher_kept, teacher)  # by default the teacher's logits are left alone
    assert not torch.equal(teacher_reused, teacher)  # reused: they held the stored gradient
    assert grad_kept[~mask].abs().max() == 0 and grad_kept[..., vocab:].abs().max() == 0
