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
