"""Two tokenizations of one text aligned on its UTF-8 bytes (the package's docstring says how), and a
student batch's rows in the teacher's tokens with the position pairs the soft term compares."""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def byte_ends(text: str, offsets: Sequence[tuple[int, int]], lengths: Sequence[int] | None = None) -> list[int]:
    """Each token's end as a byte offset into `text`'s UTF-8, never decreasing; the last token ends at
    the text's end (bytes no token claims, such as trimmed trailing spaces, join it). `lengths`: each
    token's exact byte length (`byte_lengths`), used when they add up to the text's bytes: the pieces of
    a character split into several tokens then end where their bytes do, where character offsets
    would give them all the character's end. A SentencePiece tokenizer writes a space before a text that
    does not start with one (its dummy prefix): that one byte more is the first token's that has bytes."""
    size = len(text.encode("utf-8"))
    if lengths is not None and sum(lengths) == size + 1 and not text.startswith(" "):
        first = next(i for i, n in enumerate(lengths) if n > 0)
        lengths = [*lengths[:first], lengths[first] - 1, *lengths[first + 1 :]]
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
def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes-to-unicode table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


METASPACE = "\u2581"  # SentencePiece's "▁", a space in its tokens
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


@functools.lru_cache(maxsize=16)  # per tokenizer object: its JSON is read once, not at every row
def spelling(tokenizer) -> str | None:
    """How a tokenizer's tokens spell their exact bytes: "byte_level" (GPT-2's alphabet: Llama 3, Qwen,
    GPT-NeoX), "metaspace" (SentencePiece's: "▁" for a space, `<0xNN>` byte-fallback tokens, the text
    otherwise unchanged: Llama 2, Mistral, Gemma), or None (a normalizer that rewrites the text, or
    unknown characters lost to an unk token: no exact bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if "ByteLevel" in str(backend.decoder):
        return "byte_level"
    saved = json.loads(backend.to_str())
    if not (saved.get("model") or {}).get("byte_fallback"):
        return None  # a character outside the vocabulary would become an unk token, its bytes lost
    normalizer = saved.get("normalizer")
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    # Normalizers that only write "▁" for a space (or before the text) keep the bytes; any other rewrites them.
    if any(step["type"] not in ("Replace", "Prepend") or METASPACE not in json.dumps(step) for step in steps):
        return None
    uses_metaspace = METASPACE in str(backend.decoder) + str(backend.pre_tokenizer) + json.dumps(normalizer)
    return "metaspace" if uses_metaspace else None


def spell(tokenizer, ids: Sequence[int]) -> list[bytes | None] | None:
    """Each of `ids`'s exact bytes (None for a special token), or None for a tokenizer whose tokens do
    not spell them (`spelling`)."""
    kind = spelling(tokenizer)
    if kind is None:
        return None
    special = _special_ids(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    if kind == "byte_level":
        alphabet = byte_alphabet()
        if any(i not in special and any(c not in alphabet for c in t) for i, t in zip(ids, tokens, strict=True)):
            return None
        return [None if i in special else bytes(alphabet[c] for c in t) for i, t in zip(ids, tokens, strict=True)]
    return [None if i in special else _metaspace_bytes(t) for i, t in zip(ids, tokens, strict=True)]


@functools.lru_cache(maxsize=16)  # all_special_ids is rebuilt at every read; rows read it at every step
def _special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids)


def _metaspace_bytes(token: str) -> bytes:
    byte = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(byte[1], 16)]) if byte else token.replace(METASPACE, " ").encode("utf-8")


def is_byte(token: str) -> bool:
    """A SentencePiece byte-fallback token (`<0xNN>`)."""
    return _BYTE_TOKEN.fullmatch(token) is not None


def byte_lengths(tokenizer, ids: Sequence[int]) -> list[int] | None:
    """Each token's exact byte length (special tokens: 0), or None for a tokenizer whose tokens do not
    spell their bytes (`spelling`)."""
    spelled = spell(tokenizer, ids)
    return None if spelled is None else [0 if data is None else len(data) for data in spelled]


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


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's exact bytes (None for a special token), for a tokenizer that spells them (`spelling`)."""
    return spell(tokenizer, range(len(tokenizer)))


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
        teacher_ids, teacher_ends, student_ends = tokens
        rows.append(teacher_ids)
        targets = loss_mask[row, 1 : len(ids)].nonzero().squeeze(-1).tolist()  # position t predicts t + 1
        if pairing == "positional":
            pairs = [(t, t) for t in targets if t < len(teacher_ids) - 1]
        else:
            alignment = align(student_ends, teacher_ends)
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


def teacher_tokens(
    student_tokenizer, teacher_tokenizer, ids: Sequence[int]
) -> tuple[list[int], list[int], list[int]] | None:
    """A student row's text (its tokens decoded exactly) in the teacher's tokens, framed as the row is
    (`_framed`): (teacher ids, their byte ends, the student tokens' byte ends); None for a row whose bytes
    are not text (a window that splits a character) or that leaves the teacher nothing (an empty text, a
    teacher without BOS). The row is spelled once, for its text and its ends alike."""
    spelled = spell(student_tokenizer, ids)
    if spelled is None:
        return None
    data = b"".join(piece for piece in spelled if piece is not None)
    text = data.decode("utf-8", errors="ignore")
    if text.encode("utf-8") != data:
        return None
    teacher_ids, teacher_ends = _framed(teacher_tokenizer, text, student_tokenizer, ids)
    student_ends = list(itertools.accumulate(0 if piece is None else len(piece) for piece in spelled))
    return (teacher_ids, teacher_ends, student_ends) if teacher_ids else None


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
