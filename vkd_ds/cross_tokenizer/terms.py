"""The divergences between a teacher's and a student's next-token distributions over different
vocabularies at paired positions (the package's docstring says which), chunked."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vkd_ds.cross_tokenizer.alignment import METASPACE, byte_alphabet, is_byte, spelling, token_bytes
from vkd_ds.losses import DIVERGENCES, LOG_ZERO, Divergence, SparseTeacher


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ |sort(p) − sort(q)| per row, both sorted descending, the shorter padded with zeros: [N]."""
    width = max(p.shape[-1], q.shape[-1])
    p_sorted = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    q_sorted = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (p_sorted - q_sorted).abs().sum(-1)


def vocabulary_keys(tokenizer) -> list[bytes | str]:
    """What identifies each id across tokenizers: its exact bytes (`token_bytes`), or a special token's
    name. "Ġthe" (byte-level BPE) and "▁the" (SentencePiece) are both b" the". A SentencePiece byte token
    (`<0x41>`) that spells what a text token does ("A") keeps its name: keys are unique, and the text
    token is the one the tokenizer writes."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    spelled = token_bytes(tokenizer)
    text_tokens = {data for name, data in zip(names, spelled, strict=True) if data is not None and not is_byte(name)}
    return [
        name if data is None or (is_byte(name) and data in text_tokens) else data
        for name, data in zip(names, spelled, strict=True)
    ]


def shared_vocabulary(
    student_tokens: Sequence[bytes | str], teacher_tokens: Sequence[bytes | str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens whose keys are identical in both vocabularies
    (`vocabulary_keys`), in teacher-id order."""
    student_id = {token: i for i, token in enumerate(student_tokens)}
    pairs = [(student_id[token], t) for t, token in enumerate(teacher_tokens) if token in student_id]
    if not pairs:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    student_ids, teacher_ids = zip(*pairs, strict=True)
    return torch.tensor(student_ids), torch.tensor(teacher_ids)


def _complement(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The ids of [0, vocab) not in `ids`."""
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[ids.cpu()] = False
    return keep.nonzero().squeeze(-1)


def aligned_hybrid(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    divergence: Divergence,
) -> torch.Tensor:
    """Per aligned position [N]: the configured divergence (T²·D, `loss.divergence`) between the teacher's
    and the student's distributions over the shared tokens, plus the sorted L1 of their probabilities at
    T over the tokens that are not shared. teacher_logits [N, V_T] and student_logits [N, V_S] at the
    groups' last tokens. Differentiable in the student's logits: the shared part carries the divergence's
    own analytic gradient (losses.DIVERGENCES), the rest autograd's."""
    t = divergence.temperature
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    shared_student = student[:, student_ids]
    value, grad = DIVERGENCES[divergence.kind](
        shared_student.detach().clone(), teacher[:, teacher_ids].clone(), divergence
    )
    surrogate = (grad * shared_student).sum(-1)
    shared = value + (surrogate - surrogate.detach())  # the value, with d/dz_S = grad
    rest_teacher = _complement(teacher_ids, teacher.shape[-1])
    rest_student = _complement(student_ids, student.shape[-1])
    if rest_teacher.numel() == 0 and rest_student.numel() == 0:
        return shared
    p = (teacher / t).softmax(-1)[:, rest_teacher.to(teacher.device)]
    q = (student / t).softmax(-1)[:, rest_student.to(student.device)]
    return shared + sorted_l1(p, q)


def projection(student_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """[V_T] the student token each teacher token's probability goes to: the first token of the
    student's own BPE of its bytes (its merges, not the longest student token that fits: a student
    learns its tokenizer's splits from the data and never sees the longest fit where they differ);
    a special token goes to the student's special token of the same string, or nowhere (−1). The
    BPE runs on the token's bytes alone, without the text that follows them."""
    model = student_tokenizer.backend_tokenizer.model
    first = _first_token(spelling(student_tokenizer), model, student_tokenizer)
    special_ids = student_tokenizer.all_special_ids
    student_special = dict(zip(student_tokenizer.convert_ids_to_tokens(special_ids), special_ids, strict=True))
    names = teacher_tokenizer.convert_ids_to_tokens(list(range(len(teacher_tokenizer))))
    target = [
        student_special.get(name, -1) if data is None else first(data)
        for name, data in zip(names, token_bytes(teacher_tokenizer), strict=True)
    ]
    return torch.tensor(target, dtype=torch.long)


def _first_token(kind: str, model, tokenizer):
    """bytes -> the id of the first token of the student model's BPE of them, written in its alphabet:
    GPT-2's byte characters, or SentencePiece's text with "▁" for a space, where bytes that are not
    whole characters (a teacher token that splits one) start with their first byte's fallback token."""
    if kind == "byte_level":
        to_char = {byte: char for char, byte in byte_alphabet().items()}
        return lambda data: model.tokenize("".join(to_char[b] for b in data))[0].id

    def first(data: bytes) -> int:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as bad:
            text = data[: bad.start].decode("utf-8")
        if not text:
            return tokenizer.convert_tokens_to_ids(f"<0x{data[0]:02X}>")
        return model.tokenize(text.replace(" ", METASPACE))[0].id

    return first


def projected(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, carry: torch.Tensor, divergence: Divergence
) -> torch.Tensor:
    """Per aligned position [N]: T²·D (`loss.divergence`) between the teacher's distribution at T carried
    onto the student's vocabulary by `carry` (`projection`'s; mass sent nowhere is dropped and the rest
    renormalized) and the student's. Differentiable in the student's logits, with the divergence's own
    analytic gradient (losses.DIVERGENCES)."""
    t = divergence.temperature
    student = student_logits.float()
    p = (teacher_logits.detach().float() / t).softmax(-1)
    kept = (carry >= 0).nonzero().squeeze(-1).to(p.device)
    carried = p.new_zeros(len(p), student.shape[-1]).index_add_(1, carry.to(p.device)[kept], p[:, kept])
    carried = carried / carried.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    teacher_at_t = carried.log().clamp(min=LOG_ZERO).mul_(t)  # logits whose softmax at T is `carried`
    value, grad = DIVERGENCES[divergence.kind](student.detach().clone(), teacher_at_t, divergence)
    surrogate = (grad * student).sum(-1)
    return value + (surrogate - surrogate.detach())  # the value, with d/dz_S = grad


def positional_uld(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """ULD per position [min(T_T, T_S)]: the i-th teacher and student positions, sorted L1 of their
    probabilities."""
    n = min(teacher_logits.shape[0], student_logits.shape[0])
    return sorted_l1(teacher_logits[:n].float().softmax(-1), student_logits[:n].float().softmax(-1))


def sparse_logits(teacher: SparseTeacher, rows: slice, vocab: int) -> torch.Tensor:
    """Dense logits [n, vocab] for a teacher cache's rows (top-k and tail at T): z = T·log p̂, p̂ the
    cached top-k probabilities with the tail's mass spread evenly over the other tokens. softmax(z/T) is
    p̂; at k = V (no tail) z is the teacher's logits up to a constant per row, so every divergence of
    them, at any temperature, is the live teacher's. Below V the tail's shape is unknown and the even
    spread is its maximum-entropy guess."""
    ids, logp = teacher.ids[rows], teacher.logp[rows].float()
    outside = vocab - ids.shape[1]
    fill = teacher.log_tail[rows].float() - math.log(outside) if outside > 0 else logp.new_full((len(ids),), LOG_ZERO)
    z = fill[:, None].expand(len(ids), vocab).clone()
    z.scatter_(1, ids, logp)
    return z.mul_(teacher.temperature)


def cross_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    pairs: tuple[torch.Tensor, torch.Tensor],
    divergence: Divergence,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
    vocab_sizes: tuple[int, int],
    chunk_tokens: int = 1024,
    carry: torch.Tensor | None = None,
) -> torch.Tensor:
    """The soft term across tokenizers per student row [B]: the mean over the row's position pairs
    (`pairs`: TeacherRows.student and .teacher) of `projected` (with `carry`, `projection`'s),
    `aligned_hybrid` (with `shared`, the (student ids, teacher ids) of
    `shared_vocabulary`) or, without either, positional ULD; 0 for a row without pairs.
    student_logits [B, S, ≥V_S]; teacher_logits [B, S_T, ≥V_T], or a teacher cache's SparseTeacher
    holding one row per pair in the pairs' order (`sparse_logits`). Only the tokenizers' `vocab_sizes`
    (V_S, V_T) columns count (padded LM-head columns do not). The pairs run `chunk_tokens` at a time
    and each chunk is recomputed in backward, so no [pairs, vocab] buffer outlives its chunk."""
    from torch.utils.checkpoint import checkpoint

    student_vocab, teacher_vocab = vocab_sizes
    batch = student_logits.shape[0]
    total = student_logits.new_zeros(batch, dtype=torch.float32)
    counts = torch.zeros(batch, dtype=torch.float32, device=student_logits.device)
    student_at, teacher_at = pairs[0].to(student_logits.device), pairs[1].to(student_logits.device)

    def chunk_value(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if carry is not None:
            return projected(teacher, student, carry, divergence)
        if shared is None:
            return positional_uld(teacher, student)
        return aligned_hybrid(teacher, student, shared[0], shared[1], divergence)

    for start in range(0, len(student_at), chunk_tokens):
        s, t = student_at[start : start + chunk_tokens], teacher_at[start : start + chunk_tokens]
        student = student_logits[s[:, 0], s[:, 1], :student_vocab]
        if isinstance(teacher_logits, SparseTeacher):
            teacher = sparse_logits(teacher_logits, slice(start, start + len(t)), teacher_vocab)
        else:
            teacher = teacher_logits[t[:, 0], t[:, 1], :teacher_vocab].detach()
        value = (
            checkpoint(chunk_value, student, teacher, use_reentrant=False)
            if student.requires_grad
            else chunk_value(student, teacher)
        )
        total = total.index_add(0, s[:, 0], value)
        counts.index_add_(0, s[:, 0], torch.ones_like(value, dtype=torch.float32))
    return total / counts.clamp(min=1.0)
