"""Sparse token KD against a teacher cache's top-k + tail bucket: every divergence against a float64
autograd formula of the bucketed distributions, and the dense divergence at k = V (the fused head:
test_losses.py)."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_losses import KINDS, dense_token_divergence
from vkd_ds.losses import Divergence, SparseTeacher, divergence_per_sequence, shift_for_next_token
from vkd_ds.teacher_cache import teacher_rows


def sparse_of(teacher_logits, mask, vocab, k, temperature) -> SparseTeacher:
    targets = torch.zeros(mask.shape, dtype=torch.long)
    rows = teacher_rows(teacher_logits, targets, mask, vocab, k, temperature, chunk_tokens=5)
    return SparseTeacher(rows["ids"], rows["logp"], rows["tail"], temperature)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 6, 28])
def test_sparse_divergence_is_the_bucketed_one(logits, kind, k):
    """Value and gradient within 1e-5 of float64 autograd on the k+1 buckets, chunked or not, T ≠ 1."""
    student, teacher, mask, vocab = logits
    temperature, beta, alpha = 2.0, 0.3, 0.2
    d = Divergence(kind, temperature, beta, alpha)
    want = dense_token_divergence(student, teacher, mask, kind, temperature, vocab, top_k=k, beta=beta, alpha=alpha)
    upstream = torch.randn(mask.shape[0])
    (grad_want,) = torch.autograd.grad((want * upstream.double()).sum(), student)
    sparse = sparse_of(teacher, mask, vocab, k, temperature)
    for chunk in (1, 4, 1024):
        got = divergence_per_sequence(student, sparse, mask, d, vocab, chunk)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        (grad_got,) = torch.autograd.grad((got * upstream).sum(), student)
        torch.testing.assert_close(grad_got, grad_want.float(), atol=1e-5, rtol=1e-5)
        assert grad_got[..., vocab:].abs().max() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_at_k_equal_to_the_vocabulary_sparse_is_the_dense_divergence(logits, kind):
    student, teacher, mask, vocab = logits
    d = Divergence(kind, 4.0, 0.5, 0.1)
    dense = divergence_per_sequence(student, teacher, mask, d, vocab)
    sparse = divergence_per_sequence(student, sparse_of(teacher, mask, vocab, vocab, 4.0), mask, d, vocab)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    upstream = torch.randn(mask.shape[0])
    got = torch.autograd.grad((sparse * upstream).sum(), student)[0]
    want = torch.autograd.grad((dense * upstream).sum(), student)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sparse_is_at_most_dense_and_grows_to_it_with_k(logits):
    """Merging outcomes never increases a divergence (data processing): forward KL with top-k rises to dense."""
    student, teacher, mask, vocab = logits
    d = Divergence("forward_kl", 1.0)
    dense = divergence_per_sequence(student, teacher, mask, d, vocab).detach()
    values = [
        divergence_per_sequence(student, sparse_of(teacher, mask, vocab, k, 1.0), mask, d, vocab).detach()
        for k in (1, 4, 16, vocab)
    ]
    for smaller, larger in zip(values[:-1], values[1:], strict=True):
        assert bool((smaller <= larger + 1e-6).all())
    torch.testing.assert_close(values[-1], dense, atol=1e-6, rtol=1e-5)


def test_stored_rows_are_the_teachers_distribution(logits):
    """logp is log softmax(z/T) at the top-k (most probable first), tail the log of the rest, entropy and
    the target's log-prob at T = 1."""
    _, teacher, mask, vocab = logits
    targets, _ = shift_for_next_token(torch.randint(0, vocab, mask.shape), mask)
    rows = teacher_rows(teacher, targets, mask, vocab, 6, 2.0, chunk_tokens=3)
    z = teacher[mask][:, :vocab].double()
    log_p = F.log_softmax(z / 2.0, -1)
    top = z.topk(6, -1)
    assert torch.equal(rows["ids"], top.indices)
    torch.testing.assert_close(rows["logp"].double(), log_p.gather(1, top.indices), atol=1e-5, rtol=1e-5)
    tail = torch.log1p(-log_p.gather(1, top.indices).exp().sum(-1))
    torch.testing.assert_close(rows["tail"].double(), tail, atol=1e-5, rtol=1e-5)
    log_p1 = F.log_softmax(z, -1)
    torch.testing.assert_close(rows["entropy"].double(), -(log_p1.exp() * log_p1).sum(-1), atol=1e-5, rtol=1e-5)
    want_target = log_p1.gather(1, targets[mask][:, None]).squeeze(1)
    torch.testing.assert_close(rows["target_logp"].double(), want_target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [5, 37])
def test_ce_and_sparse_kd_in_one_pass_equal_the_two_terms(logits, kind, temperature, k):
    """cached_token_losses (one pass over the logits, one gradient tensor) against token_ce and the
    sparse divergence computed apart: values and the gradient of any weighted sum of the two."""
    from vkd_ds.losses import cached_token_losses, token_ce

    student, teacher, mask, vocab = logits
    targets = torch.randint(0, vocab, mask.shape, generator=torch.Generator().manual_seed(5))
    d = Divergence(kind, temperature, 0.5, 0.1)
    sparse = sparse_of(teacher, mask, vocab, k, temperature)
    a, b = torch.randn(mask.shape[0]), torch.randn(mask.shape[0])
    want_ce = token_ce(student, targets, mask, vocab, 7)
    want_soft = divergence_per_sequence(student, sparse, mask, d, vocab, 7)
    (want_grad,) = torch.autograd.grad((a * want_ce + b * want_soft).sum(), student)
    for chunk in (3, 1024):
        ce, soft = cached_token_losses(student, targets, sparse, mask, d, vocab, chunk)
        torch.testing.assert_close(ce, want_ce, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(soft, want_soft, atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad((a * ce + b * soft).sum(), student)
        torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_pass_with_every_position_and_the_exact_vocabulary(temperature):
    """The in-place backward (every position selected, logits exactly V wide) gives the same gradient."""
    from vkd_ds.losses import cached_token_losses, token_ce

    torch.manual_seed(2)
    vocab = 23
    student = torch.randn(2, 5, vocab, requires_grad=True)
    teacher = torch.randn(2, 5, vocab) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    targets = torch.randint(0, vocab, mask.shape)
    d = Divergence("forward_kl", temperature)
    sparse = sparse_of(teacher, mask, vocab, 4, temperature)
    want = token_ce(student, targets, mask, vocab) + 0.7 * divergence_per_sequence(student, sparse, mask, d, vocab)
    (want_grad,) = torch.autograd.grad(want.sum(), student)
    ce, soft = cached_token_losses(student, targets, sparse, mask, d, vocab, 4)
    (grad,) = torch.autograd.grad((ce + 0.7 * soft).sum(), student)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_pass_on_bf16_logits_keeps_bf16_and_matches_fp32(logits, temperature):
    """bf16 logits (the GPU path): the gradient stays bf16, and is the fp32 one rounded (the kept
    exponentials are rounded once)."""
    from vkd_ds.losses import cached_token_losses

    student, teacher, mask, vocab = logits
    targets = torch.randint(0, vocab, mask.shape, generator=torch.Generator().manual_seed(5))
    d = Divergence("forward_kl", temperature)
    sparse = sparse_of(teacher, mask, vocab, 5, temperature)
    half = student.detach().bfloat16().requires_grad_()
    full = half.detach().float().requires_grad_()
    grads = []
    for x in (half, full):
        ce, soft = cached_token_losses(x, targets, sparse, mask, d, vocab, 7)
        grads.append(torch.autograd.grad((ce + 0.5 * soft).sum(), x)[0])
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].float(), grads[1], atol=2e-3, rtol=2e-2)
