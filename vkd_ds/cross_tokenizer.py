"""Distillation across tokenizers (issue #34, in progress): the alignment of two tokenizations of one text
on UTF-8 byte offsets, and the divergences that compare a teacher's and a student's next-token
distributions over different vocabularies.

Alignment. Each token is given the byte offset where it ends (from the tokenizer's character offsets;
a token's bytes are those from the previous token's end to its own, so the tokens of one tokenizer
cover the text's bytes exactly once, whatever its offsets leave out). A *group* ends at every byte
offset where a token of each tokenizer ends: groups partition both token sequences into contiguous
runs, every group holds at least one token of each, and their bytes concatenate to the text. Tokens
without text (BOS, EOS, and all but the last piece of a character split into several tokens) are
zero bytes wide: the j-th of them at a byte offset pairs with the other side's j-th there, if any,
else joins the group its end falls in.

At the last token of group g both models predict what follows the same byte: the teacher over its
vocabulary, the student over its own. The divergences compare those two distributions:
- `aligned_hybrid` (TRL GOLD's hybrid): token ids whose strings are identical in both vocabularies are
  compared by the configured divergence D on their probabilities; the rest of each distribution by the
  L1 distance of their sorted probabilities (ULD). With identical tokenizers every token matches,
  groups are single tokens, and it is exactly D.
- `projected`: the teacher's distribution is carried onto the student's vocabulary, each teacher
  token's probability given to the first token of the student's own tokenization (its BPE merges)
  of that token's bytes, and compared with the student's by the configured divergence D over the
  whole vocabulary. With identical tokenizers every token carries to itself, and it is exactly D.
  Only group ends are compared: inside a teacher token, conditioning the teacher on the bytes read
  so far would tell the student that the teacher's token goes on, which is the text to come.
- `positional_uld` (ULD, Boizard et al. 2024, the baseline): the i-th positions of both sequences are
  paired by index, whatever their text, and compared by the L1 distance of their sorted probabilities.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkd_ds.losses import DIVERGENCES, LOG_ZERO, Divergence, SparseTeacher


def byte_ends(text: str, offsets: Sequence[tuple[int, int]], lengths: Sequence[int] | None = None) -> list[int]:
    """Each token's end as a byte offset into `text`'s UTF-8, never decreasing; the last token ends at
    the text's end (bytes no token claims, such as trimmed trailing spaces, join it). `lengths`: each
    token's exact byte length (`byte_lengths`), used when they add up to the text's bytes: the pieces of
    a character split into several tokens then end where their bytes do, where character offsets
    would give them all the character's end."""
    size = len(text.encode("utf-8"))
    if lengths is not None and sum(lengths) == size:
        return list(itertools.accumulate(lengths))
    char_to_byte = [0, *itertools.accumulate(len(char.encode("utf-8")) for char in text)]
    ends, last = [], 0
    for _, end in offsets:
        last = max(last, char_to_byte[end])
        ends.append(last)
    if ends:
        ends[-1] = size
    return ends


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes-to-unicode table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


def byte_lengths(tokenizer, ids: Sequence[int]) -> list[int] | None:
    """Each token's exact byte length for a byte-level BPE tokenizer (special tokens: 0), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in str(backend.decoder):
        return None
    alphabet, special = _byte_alphabet(), set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    if any(i not in special and any(c not in alphabet for c in t) for i, t in zip(ids, tokens, strict=True)):
        return None
    return [0 if i in special else len(t) for i, t in zip(ids, tokens, strict=True)]


@dataclass(frozen=True)
class Alignment:
    """Groups of two tokenizations of one text. Group g holds student tokens
    [student_starts[g], student_starts[g+1]) and teacher tokens likewise, and bytes
    [byte_ends[g-1], byte_ends[g]) of the text (byte_ends[-1] is the text's length)."""

    byte_ends: tuple[int, ...]
    student_starts: tuple[int, ...]  # len(groups) + 1 entries; the last is the student's token count
    teacher_starts: tuple[int, ...]

    @property
    def groups(self) -> int:
        return len(self.byte_ends)

    def student_last(self) -> list[int]:
        """The student's last token of each group: where it predicts what follows the group."""
        return [end - 1 for end in self.student_starts[1:]]

    def teacher_last(self) -> list[int]:
        return [end - 1 for end in self.teacher_starts[1:]]


def _keys(ends: list[int]) -> list[tuple[int, int]]:
    """(byte end, how many earlier tokens end there too) per token: strictly increasing, so the j-th
    zero-width token at a byte pairs with the other tokenization's j-th there (BOS with BOS, and every
    token with itself when both tokenizations are the same)."""
    keys, previous, count = [], None, 0
    for end in ends:
        count = count + 1 if end == previous else 0
        keys.append((end, count))
        previous = end
    return keys


def _starts(keys: list[tuple[int, int]], boundaries: list[tuple[int, int]]) -> tuple[int, ...]:
    """Where each group's tokens start: a token is in the first group whose boundary is at or after its
    key; tokens after the last shared boundary (an EOS only one side has) join the last group."""
    last = len(boundaries) - 1
    group_of = [min(bisect.bisect_left(boundaries, key), last) for key in keys]
    return (0, *(bisect.bisect_left(group_of, group) for group in range(1, len(boundaries))), len(keys))


def align(student_ends: list[int], teacher_ends: list[int]) -> Alignment:
    """The groups of two tokenizations of one text, from each token's byte end (`byte_ends`)."""
    if not student_ends or not teacher_ends:
        raise ValueError("cannot align an empty tokenization")
    if student_ends[-1] != teacher_ends[-1]:
        raise ValueError(f"the tokenizations cover different texts ({student_ends[-1]} and {teacher_ends[-1]} bytes)")
    student_keys, teacher_keys = _keys(student_ends), _keys(teacher_ends)
    # (text's end, 0) is always shared: each side's first token to reach the end closes the last group.
    shared = sorted(set(student_keys) & set(teacher_keys))
    return Alignment(tuple(end for end, _ in shared), _starts(student_keys, shared), _starts(teacher_keys, shared))


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ |sort(p) − sort(q)| per row, both sorted descending, the shorter padded with zeros: [N]."""
    width = max(p.shape[-1], q.shape[-1])
    p_sorted = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    q_sorted = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (p_sorted - q_sorted).abs().sum(-1)


def shared_vocabulary(
    student_tokens: Sequence[str], teacher_tokens: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens whose strings are identical in both vocabularies
    (strings as each tokenizer's `convert_ids_to_tokens` writes them), in teacher-id order."""
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


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's exact bytes for a byte-level BPE tokenizer (None for a special token)."""
    alphabet, special = _byte_alphabet(), set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if i in special else bytes(alphabet[c] for c in t) for i, t in enumerate(tokens)]


def projection(student_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """[V_T] the student token each teacher token's probability goes to: the first token of the
    student's own BPE of its bytes (its merges, not the longest student token that fits: a student
    learns its tokenizer's splits from the data and never sees the longest fit where they differ);
    a special token goes to the student's special token of the same string, or nowhere (−1). The
    BPE runs on the token's bytes alone, without the text that follows them."""
    model = student_tokenizer.backend_tokenizer.model
    to_char = {byte: char for char, byte in _byte_alphabet().items()}
    special_ids = student_tokenizer.all_special_ids
    student_special = dict(zip(student_tokenizer.convert_ids_to_tokens(special_ids), special_ids, strict=True))
    names = teacher_tokenizer.convert_ids_to_tokens(list(range(len(teacher_tokenizer))))
    target = [
        student_special.get(name, -1) if data is None else model.tokenize("".join(to_char[b] for b in data))[0].id
        for name, data in zip(names, token_bytes(teacher_tokenizer), strict=True)
    ]
    return torch.tensor(target, dtype=torch.long)


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


def text_bytes(tokenizer, ids: Sequence[int]) -> bytes | None:
    """The exact bytes a byte-level BPE tokenizer's `ids` stand for (special tokens: none); None for a
    tokenizer that is not byte-level."""
    lengths = byte_lengths(tokenizer, ids)
    if lengths is None:
        return None
    alphabet, special = _byte_alphabet(), set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    return b"".join(bytes(alphabet[c] for c in t) for i, t in zip(ids, tokens, strict=True) if i not in special)


@dataclass(frozen=True)
class TeacherRows:
    """A student batch's rows in the teacher's tokens, and the positions the divergence compares: pair k
    is the student's position student[k] = (row, t) and the teacher's teacher[k] = (row, t'), both
    predicting what follows the same byte (or the same index, for positional ULD), at a student position
    whose next token is a training target."""

    input_ids: torch.Tensor  # [B, S_T], right-padded
    attention_mask: torch.Tensor  # [B, S_T]
    student: torch.Tensor  # [N, 2] (row, position)
    teacher: torch.Tensor  # [N, 2]
    unaligned_rows: int  # rows whose bytes are not text (a window that splits a character): not distilled


def teacher_rows(
    student_ids: Sequence[Sequence[int]],
    loss_mask: torch.Tensor,
    student_tokenizer,
    teacher_tokenizer,
    pairing: str = "aligned",
) -> TeacherRows:
    """Each row's text (the student's tokens decoded exactly) tokenized by the teacher, with the teacher's
    special tokens, and the pairs of positions to compare: `aligned` at the groups' last tokens
    (`align`), `positional` by index (ULD). `loss_mask` [B, S]: the student batch's targets."""
    rows, student_pairs, teacher_pairs, unaligned = [], [], [], 0
    for row, ids in enumerate(student_ids):
        tokens = teacher_tokens(student_tokenizer, teacher_tokenizer, ids)
        if tokens is None:
            rows.append([teacher_tokenizer.pad_token_id])
            unaligned += 1
            continue
        teacher_ids, teacher_ends = tokens
        rows.append(teacher_ids)
        targets = loss_mask[row, 1 : len(ids)].nonzero().squeeze(-1).tolist()  # position t predicts t + 1
        if pairing == "positional":
            pairs = [(t, t) for t in targets if t < len(teacher_ids) - 1]
        else:
            alignment = align(list(itertools.accumulate(byte_lengths(student_tokenizer, ids))), teacher_ends)
            wanted = set(targets)
            last_pairs = zip(alignment.student_last()[:-1], alignment.teacher_last()[:-1], strict=True)
            pairs = [(s, t) for s, t in last_pairs if s in wanted]
        student_pairs += [(row, s) for s, _ in pairs]
        teacher_pairs += [(row, t) for _, t in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), teacher_tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return TeacherRows(input_ids, attention_mask, _pairs(student_pairs), _pairs(teacher_pairs), unaligned)


def teacher_tokens(student_tokenizer, teacher_tokenizer, ids: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """A student row's text (its tokens decoded exactly) in the teacher's tokens, framed as the row is
    (`_framed`), with each token's byte end; None for a row whose bytes are not text (a window that
    splits a character) or that leaves the teacher nothing (an empty text, a teacher without BOS)."""
    data = text_bytes(student_tokenizer, ids)
    text = data.decode("utf-8", errors="ignore") if data is not None else None
    if text is None or text.encode("utf-8") != data:
        return None
    teacher_ids, teacher_ends = _framed(teacher_tokenizer, text, student_tokenizer, ids)
    return (teacher_ids, teacher_ends) if teacher_ids else None


def _pairs(pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def _framed(teacher_tokenizer, text: str, student_tokenizer, student_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The teacher's ids of `text` and their byte ends, framed as the student's row is: the teacher's
    BOS where the row starts with the student's, its EOS where the row ends with the student's (the
    tokenizers' special tokens differ; the text between them is what is compared)."""
    encoded = teacher_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(encoded["input_ids"])
    ends = byte_ends(text, encoded["offset_mapping"], byte_lengths(teacher_tokenizer, ids))
    bos, eos = teacher_tokenizer.bos_token_id, teacher_tokenizer.eos_token_id
    if bos is not None and student_ids[0] == student_tokenizer.bos_token_id:
        ids, ends = [bos, *ids], [0, *ends]
    if eos is not None and student_ids[-1] == student_tokenizer.eos_token_id:
        ids, ends = [*ids, eos], [*ends, len(text.encode("utf-8"))]
    return ids, ends


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


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tokenizers and tensors
class CrossVocab:
    """What distilling across tokenizers needs at every step: both tokenizers, the pairing
    (loss.cross_tokenizer), the shared tokens and the teacher tokenizer's vocabulary size."""

    student_tokenizer: object
    teacher_tokenizer: object
    pairing: str  # projected | aligned | positional_uld (loss.cross_tokenizer)
    student_ids: torch.Tensor  # shared_vocabulary's
    teacher_ids: torch.Tensor
    teacher_vocab: int
    carry: torch.Tensor | None  # `projection`'s, for `projected`

    @classmethod
    def of(cls, student_tokenizer, teacher_tokenizer, pairing: str) -> CrossVocab:
        names = [t.convert_ids_to_tokens(list(range(len(t)))) for t in (student_tokenizer, teacher_tokenizer)]
        student_ids, teacher_ids = shared_vocabulary(*names)
        carry = projection(student_tokenizer, teacher_tokenizer) if pairing == "projected" else None
        vocab = len(teacher_tokenizer)
        return cls(student_tokenizer, teacher_tokenizer, pairing, student_ids, teacher_ids, vocab, carry)

    def batch_fields(self, examples_ids: Sequence[Sequence[int]], loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """A host batch's teacher rows and position pairs (TeacherRows), as batch entries."""
        pairing = "positional" if self.pairing == "positional_uld" else "aligned"
        rows = teacher_rows(examples_ids, loss_mask, self.student_tokenizer, self.teacher_tokenizer, pairing)
        fields = {
            "teacher_input_ids": rows.input_ids,
            "teacher_attention_mask": rows.attention_mask,
            "pairs_student": rows.student,
            "pairs_teacher": rows.teacher,
            "unaligned_rows": torch.tensor(rows.unaligned_rows),
        }
        return fields

    def teacher_positions(self, ids: Sequence[int]) -> int:
        """How many of a student row's teacher tokens have a next token (what a teacher cache stores)."""
        tokens = teacher_tokens(self.student_tokenizer, self.teacher_tokenizer, ids)
        return 0 if tokens is None else len(tokens[0]) - 1

    def soft(self, student_logits, teacher_logits, batch_pairs, divergence: Divergence, vocab: int, chunk: int):
        shared = (self.student_ids, self.teacher_ids) if self.pairing == "aligned" else None
        sizes = (vocab, self.teacher_vocab)
        return cross_divergence(
            student_logits, teacher_logits, batch_pairs, divergence, shared, sizes, chunk, self.carry
        )
