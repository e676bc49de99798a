"""The terms on hidden states and heads rather than the vocabulary: L_val (valence MSE), L_feat
(hidden states and attention maps) and the InfoNCE of L_reg on sequence features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vkd_ds.sequences import Sequences


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
