"""The soft term's token-level divergences (`loss.divergence`): `Divergence`, its parameters, and
the registry `DIVERGENCES` of per-chunk functions, each its value and its analytic gradient."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
