"""Distillation across tokenizers (issue #34): the alignment of two tokenizations of one text
on UTF-8 byte offsets (`alignment`), the divergences that compare a teacher's and a student's next-token
distributions over different vocabularies (`terms`), and what a run needs of both (`CrossVocab`, here).

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
- `aligned_hybrid` (TRL GOLD's hybrid): token ids whose bytes are identical in both vocabularies (`vocabulary_keys`) are
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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkd_ds.cross_tokenizer.alignment import (
    Alignment,
    TeacherRows,
    align,
    byte_ends,
    byte_lengths,
    spelling,
    teacher_rows,
    teacher_tokens,
    token_bytes,
)
from vkd_ds.cross_tokenizer.terms import (
    aligned_hybrid,
    cross_divergence,
    positional_uld,
    projected,
    projection,
    shared_vocabulary,
    sorted_l1,
    sparse_logits,
    vocabulary_keys,
)
from vkd_ds.errors import VkdError
from vkd_ds.losses import Divergence


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
        keys = [vocabulary_keys(t) for t in (student_tokenizer, teacher_tokenizer)]
        student_ids, teacher_ids = shared_vocabulary(*keys)
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


def cross_vocab(s, tokenizer) -> CrossVocab | None:
    """Across tokenizers (`s.teacher.tokenizer_path`, Settings): both tokenizers must give each token's
    exact bytes (byte-level BPE), which the alignment on the text's bytes reads. None otherwise."""
    from vkd_ds.models import load_tokenizer

    if not s.cross_tokenizer:
        return None
    teacher_tokenizer = load_tokenizer(s.teacher.tokenizer_path, "teacher.tokenizer_path")
    for who, key, tok in (
        ("student", "data.tokenizer_path", tokenizer),
        ("teacher", "teacher.tokenizer_path", teacher_tokenizer),
    ):
        if spelling(tok) is None:
            raise VkdError(
                f"{key}: the {who}'s tokenizer does not spell each token's exact bytes (neither byte-level "
                "BPE nor SentencePiece with byte fallback and no text normalizer), and distilling across "
                "tokenizers aligns the texts on them"
            )
    return CrossVocab.of(tokenizer, teacher_tokenizer, s.loss.cross_tokenizer)


def check_records(splits: dict) -> None:
    """Refuse conversations (`messages` records) across tokenizers: the student's rows are its own chat
    template's rendering, whose special tokens the teacher cannot read, and the teacher's own template
    renders other text around the turns, which the byte alignment would have to map. `splits`:
    open_splits's {split: (value, rows)}."""
    chats = [f"data.{split}_path" for split, (_, rows) in splits.items() if rows.has_conversations]
    if chats:
        verb = "hold" if len(chats) > 1 else "holds"
        raise VkdError(
            f'{" and ".join(chats)} {verb} conversations ("messages" records), which distillation across '
            "tokenizers (teacher.tokenizer_path) does not handle yet: use text or prompt/completion records"
        )


__all__ = [
    "Alignment",
    "CrossVocab",
    "TeacherRows",
    "align",
    "aligned_hybrid",
    "byte_ends",
    "byte_lengths",
    "check_records",
    "cross_divergence",
    "cross_vocab",
    "positional_uld",
    "projected",
    "projection",
    "shared_vocabulary",
    "sorted_l1",
    "sparse_logits",
    "spelling",
    "teacher_rows",
    "teacher_tokens",
    "token_bytes",
    "vocabulary_keys",
]
