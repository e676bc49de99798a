"""Chunked CE and soft KD against the dense SPEC formulas: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from vkd_ds.losses import combine_terms, shift_for_next_token, soft_kd, token_ce, weighted_batch_loss


def dense_soft_kd(student, teacher, mask, temperature, vocab):
    """SPEC §2: per token KL(softmax(z_T/T) || softmax(z_S/T))·T², averaged over a sequence's valid tokens."""
    out = []
    for b in range(mask.shape[0]):
        m = mask[b]
        if not m.any():
            out.append(student.sum() * 0)
            continue
        log_p_s = F.log_softmax(student[b, m, :vocab].double() / temperature, -1)
        log_p_t = F.log_softmax(teacher[b, m, :vocab].double() / temperature, -1)
        out.append((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2)
    return torch.stack(out)


def dense_ce(student, targets, mask, vocab):
    out = []
    for b in range(mask.shape[0]):
        m = mask[b]
        out.append(F.cross_entropy(student[b, m, :vocab].double(), targets[b, m]) if m.any() else student.sum() * 0)
    return torch.stack(out)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    batch, seq, vocab = 4, 9, 37
    student = torch.randn(batch, seq, vocab + 3, requires_grad=True)  # padded past the tokenizer
    teacher = torch.randn(batch, seq, vocab + 11) * 3
    mask = torch.rand(batch, seq) > 0.3
    mask[1] = False  # a sequence with no valid token
    return student, teacher, mask, vocab


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_kd_equals_dense(logits, chunk, temperature):
    student, teacher, mask, vocab = logits
    got = soft_kd(student, teacher, mask, temperature, vocab, chunk_tokens=chunk)
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
    got = soft_kd(student, student.detach().clone(), mask, 4.0, vocab)
    assert got.abs().max() < 1e-5


def test_bf16_logits_keep_bf16_gradient(logits):
    student, teacher, mask, vocab = logits
    student16 = student.detach().bfloat16().requires_grad_()
    got = soft_kd(student16, teacher.bfloat16(), mask, 4.0, vocab)
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
        per_sequence = soft_kd(student16, teacher16, mask, 2.0, vocab)
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


def test_large_vocabularies_take_smaller_chunks_with_the_same_values():
    """At vocabulary 65536 a 256-token chunk would be 64 MiB of fp32: it is cut to 64 rows (16 MiB)
    and the per-token values and gradients stay those of the dense formula."""
    from vkd_ds.losses import chunk_rows

    assert chunk_rows(256, 8192) == 256 and chunk_rows(256, 65536) == 64 and chunk_rows(256, 10**9) == 1
    torch.manual_seed(1)
    batch, seq, vocab = 2, 70, 65536  # 140 positions: three chunks of at most 64
    student = torch.randn(batch, seq, vocab, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab)
    targets = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    ours = soft_kd(student, teacher, mask, 2.0, vocab, 256) + token_ce(student, targets, mask, vocab, 256)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    dense = dense_soft_kd(student, teacher, mask, 2.0, vocab) + dense_ce(student, targets, mask, vocab)
    (dense_grad,) = torch.autograd.grad(dense.sum(), student)
    torch.testing.assert_close(ours.double(), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-9)


def test_a_divergence_is_one_entry_of_the_registry(monkeypatch):
    """soft_kd, the fused head and the settings' check all read losses.DIVERGENCES: registering a
    function there is all a new divergence needs (here: a 'half_forward_kl' = ½·forward KL)."""
    from vkd_ds import losses
    from vkd_ds.config import compose
    from vkd_ds.errors import VkdError
    from vkd_ds.settings import Settings

    def half_forward_kl(student, teacher, temperature):
        loss, grad = losses.DIVERGENCES["forward_kl"](student, teacher, temperature)
        return loss * 0.5, grad * 0.5

    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    required = ["teacher.path=/t", "data.train_path=/d", "loss.val=0", "weighting.lam=0"]
    with pytest.raises(VkdError, match="`loss.divergence` must be one of forward_kl"):
        Settings.from_config(compose([*required, "loss.divergence=half_forward_kl"]))
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.soft_kd(student, teacher, mask, 2.0, divergence="half_forward_kl")
    monkeypatch.setitem(losses.DIVERGENCES, "half_forward_kl", half_forward_kl)
    Settings.from_config(compose([*required, "loss.divergence=half_forward_kl"]))
    full = losses.soft_kd(student, teacher, mask, 2.0, chunk_tokens=3)
    half = losses.soft_kd(student, teacher, mask, 2.0, chunk_tokens=3, divergence="half_forward_kl")
    torch.testing.assert_close(half, full * 0.5)
    (g_full,) = torch.autograd.grad(full.sum(), student)
    (g_half,) = torch.autograd.grad(half.sum(), student)
    torch.testing.assert_close(g_half, g_full * 0.5)
