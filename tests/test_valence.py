"""Valence pure functions against direct, loop-by-loop readings of docs/objective.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from vkd_ds.losses import feature_kd, valence_mse
from vkd_ds.valence import ValenceHead, effective_sample_size, saliency, valence_weights


def reference_saliency(traj, logits, mask, alphas):
    out = []
    for b in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[b, t]]
        if not pos:
            out.append(0.0)
            continue
        rows = [traj[b, t].double() for t in pos]
        flat = torch.stack(rows)
        ents = []
        for t in pos:
            p = torch.softmax(logits[b, t].double(), -1)
            ents.append(float(-(p * p.log()).sum()) / math.log(logits.shape[-1]))
        entropy = sum(ents) / len(ents)
        if len(rows) > 1:
            cos = [
                float(torch.dot(rows[i], rows[i + 1]) / (rows[i].norm() * rows[i + 1].norm()))
                for i in range(len(rows) - 1)
            ]
            coherence = sum(cos) / len(cos)
        else:
            coherence = 1.0
        a1, a2, a3, a4 = alphas
        out.append(a1 * float(flat.mean()) + a2 * float(flat.min()) + a3 * (1 - entropy) + a4 * coherence)
    return torch.tensor(out, dtype=torch.float64)


def reference_weights(s, lam, z_max, normalize, eps=1e-6):
    s = [float(x) for x in s]
    mu = sum(s) / len(s)
    sigma = math.sqrt(sum((x - mu) ** 2 for x in s) / len(s))
    w = []
    for x in s:
        z = (x - mu) / (sigma + eps)
        if z_max is not None:
            z = max(-z_max, min(z_max, z))
        w.append(math.exp(lam * z))
    if normalize:
        mean = sum(w) / len(w)
        w = [x / mean for x in w]
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 8])
def test_saliency_matches_reference(k):
    torch.manual_seed(0)
    batch, seq, vocab = 4, 7, 29
    traj = torch.sigmoid(torch.randn(batch, seq, k))
    logits = torch.randn(batch, seq, vocab) * 2
    mask = torch.rand(batch, seq) > 0.3
    mask[1] = False
    mask[2] = False
    mask[2, 3] = True  # a single valid position
    alphas = (0.55, 0.20, 0.15, 0.10)
    got = saliency(traj, logits, mask, alphas, chunk_tokens=3)
    torch.testing.assert_close(got.double(), reference_saliency(traj, logits, mask, alphas), atol=1e-5, rtol=1e-5)
    assert got[1] == 0


@pytest.mark.parametrize(
    "lam, z_max, normalize", [(6.0, 3.0, True), (6.0, None, False), (0.0, 3.0, True), (2.0, 0.5, False)]
)
def test_weights_match_reference(lam, z_max, normalize):
    torch.manual_seed(1)
    s = torch.rand(16, dtype=torch.float64)
    got = valence_weights(s, lam=lam, z_max=z_max, normalize=normalize)
    torch.testing.assert_close(got, reference_weights(s, lam, z_max, normalize), atol=1e-9, rtol=1e-9)
    if lam == 0:
        assert torch.all(got == 1)
    if normalize:
        assert abs(float(got.mean()) - 1) < 1e-12


def test_weights_of_a_batch_of_one_and_ess():
    assert valence_weights(torch.tensor([0.7])).tolist() == [1.0]
    assert float(effective_sample_size(torch.ones(8))) == pytest.approx(1.0)
    w = valence_weights(torch.linspace(0, 1, 64, dtype=torch.float64), lam=6.0)
    ess = float(effective_sample_size(w))
    assert 0 < ess < 0.5  # λ = 6 concentrates the batch on a few sequences


def test_sequences_without_a_valid_position_get_weight_zero_and_leave_the_statistics_alone():
    """A prompt that fills data.max_seq_len has no target and saliency 0: in μ and σ it moved every other
    weight (one such row in 8 took the ESS from 0.15 to 0.46). It gets weight 0 and the rest are as if
    it were not in the batch."""
    torch.manual_seed(4)
    s = torch.rand(8, dtype=torch.float64)
    valid = torch.ones(8, dtype=torch.bool)
    valid[[2, 5]] = False
    s[[2, 5]] = 0.0  # what saliency() gives a sequence without valid positions
    w = valence_weights(s, lam=6.0, valid=valid)
    assert w[2] == 0 and w[5] == 0
    torch.testing.assert_close(w[valid], valence_weights(s[valid], lam=6.0), atol=1e-12, rtol=0)
    assert float(effective_sample_size(w, valid)) == pytest.approx(float(effective_sample_size(w[valid])))
    skewed = valence_weights(s, lam=6.0)  # the old behaviour: the zeros enter μ and σ
    assert not torch.allclose(skewed[valid], w[valid])
    # No valid row at all: uniform weights (every term is 0 anyway), never a 0/0.
    assert valence_weights(s, valid=torch.zeros(8, dtype=torch.bool)).tolist() == [1.0] * 8


@pytest.mark.parametrize("k", [1, 4])
def test_valence_mse_and_feature_kd_match_reference(k):
    torch.manual_seed(2)
    batch, seq = 3, 5
    mask = torch.rand(batch, seq) > 0.4
    mask[0] = False
    v_s = torch.rand(batch, seq, k, requires_grad=True)
    v_t = torch.rand(batch, seq, k)
    got = valence_mse(v_s, v_t, mask)
    want = torch.stack(
        [F.mse_loss(v_s[b, mask[b]], v_t[b, mask[b]]) if mask[b].any() else v_s.sum() * 0 for b in range(batch)]
    )
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got.sum(), v_s)
    (g2,) = torch.autograd.grad(want.sum(), v_s)
    torch.testing.assert_close(g1, g2)

    proj = torch.nn.Linear(6, 10)
    h_s = [torch.randn(batch, seq, 6, requires_grad=True), torch.randn(batch, seq, 10, requires_grad=True)]
    h_t = [torch.randn(batch, seq, 10), torch.randn(batch, seq, 10)]
    got = feature_kd(h_s, h_t, [proj, None], mask)
    want = torch.stack(
        [
            (
                F.mse_loss(proj(h_s[0][b, mask[b]]), h_t[0][b, mask[b]])
                + F.mse_loss(h_s[1][b, mask[b]], h_t[1][b, mask[b]])
            )
            if mask[b].any()
            else proj.weight.sum() * 0
            for b in range(batch)
        ]
    )
    torch.testing.assert_close(got, want)
    grads_got = torch.autograd.grad(got.sum(), [h_s[0], h_s[1], proj.weight])
    grads_want = torch.autograd.grad(want.sum(), [h_s[0], h_s[1], proj.weight])
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b)


def test_valence_head_range_and_shape():
    head = ValenceHead(hidden_size=12, k=5)
    out = head(torch.randn(2, 3, 12) * 100)
    assert out.shape == (2, 3, 5) and out.min() >= 0 and out.max() <= 1
