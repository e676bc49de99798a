"""Alignment of two tokenizations on byte offsets, and the cross-tokenizer divergences (issue #34), on
two real byte-level BPE tokenizers of different sizes trained here (one splits digits), and a tokenizer
with SentencePiece's conventions ("▁" for a space, a dummy prefix, `<0xNN>` byte fallback)."""

from __future__ import annotations

import json

import pytest
import torch

from vkd_ds.cross_tokenizer import (
    align,
    aligned_hybrid,
    byte_ends,
    byte_lengths,
    cross_divergence,
    positional_uld,
    projected,
    projection,
    shared_vocabulary,
    sorted_l1,
    sparse_logits,
    spelling,
    teacher_rows,
    token_bytes,
    vocabulary_keys,
)
from vkd_ds.losses import DIVERGENCES, Divergence

TEXTS = {
    "ascii": "Hello, world. The quick brown fox: jumps (over) the lazy dog!",
    "emoji": "I \u2764\ufe0f \U0001f40d and \U0001f469\u200d\U0001f469\u200d\U0001f467 too \U0001f600\U0001f600",
    "cjk": "深度学习模型的蒸馏 and 知識蒸留 mixed with text",
    "digits": "in 2026 there were 1234567 tokens, 3.14159 and 0x1F",
    "whitespace": "a    b\t\t\nc  \n\n  d   \n",
    "empty-ish": " ",
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two byte-level BPE tokenizers: 300 tokens, and 600 tokens splitting digits one by one."""
    from vkd_ds.assets import pydoc_records, train_tokenizer

    texts = pydoc_records(200)
    return [
        train_tokenizer(texts, size, tmp_path_factory.mktemp("tokenizer"), split_digits=split_digits)
        for size, split_digits in ((300, False), (600, True))
    ]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """A 400-token tokenizer with SentencePiece's conventions, plus its 256 byte tokens."""
    from vkd_ds.assets import pydoc_records, train_tokenizer

    return train_tokenizer(pydoc_records(200), 400, tmp_path_factory.mktemp("sp"), sentencepiece=True)


@pytest.fixture(params=["byte_level", "sentencepiece_student", "sentencepiece_teacher"])
def pair(request, tokenizers, sentencepiece):
    """(student, teacher): the two byte-level tokenizers, or the SentencePiece one on either side."""
    return {
        "byte_level": tokenizers,
        "sentencepiece_student": [sentencepiece, tokenizers[1]],
        "sentencepiece_teacher": [tokenizers[0], sentencepiece],
    }[request.param]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes-to-unicode table, inverted (written here, apart from the module's)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(moved)}


def _spelled(tokenizer, token: str) -> bytes:
    """A token's bytes, written here apart from the module's: GPT-2's byte characters, or SentencePiece's
    "▁" for a space and `<0xNN>` for a byte."""
    if tokenizer.backend_tokenizer.model.byte_fallback:
        return bytes([int(token[3:5], 16)]) if token.startswith("<0x") else token.replace("\u2581", " ").encode()
    decoder = _byte_decoder()
    return bytes(decoder[c] for c in token)


def _tokens(tokenizer, text: str):
    """(ids, byte ends, each token's own bytes; SentencePiece's dummy prefix, a space written before a text
    that has none, is no byte of the text)."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = encoded["input_ids"]
    pieces = [_spelled(tokenizer, token) for token in tokenizer.convert_ids_to_tokens(ids)]
    if sum(map(len, pieces)) == len(text.encode()) + 1 and not text.startswith(" "):
        pieces[0] = pieces[0].removeprefix(b" ")
    return ids, byte_ends(text, encoded["offset_mapping"], byte_lengths(tokenizer, ids)), pieces


@pytest.mark.parametrize("name", list(TEXTS))
def test_groups_partition_both_tokenizations_and_their_bytes_concatenate_to_the_text(pair, name):
    text = TEXTS[name]
    student, teacher = (_tokens(tok, text) for tok in pair)
    if name == "digits":  # the digit-splitting tokenizer really tokenizes differently
        assert student[1] != teacher[1]
    alignment = align(student[1], teacher[1])
    for starts, (ids, _, _) in ((alignment.student_starts, student), (alignment.teacher_starts, teacher)):
        assert starts[0] == 0 and starts[-1] == len(ids)
        assert all(a < b for a, b in zip(starts, starts[1:], strict=False)), "every group holds a token of each"
    text_bytes, previous = text.encode("utf-8"), 0
    for g in range(alignment.groups):
        span = text_bytes[previous : alignment.byte_ends[g]]
        s = b"".join(student[2][alignment.student_starts[g] : alignment.student_starts[g + 1]])
        t = b"".join(teacher[2][alignment.teacher_starts[g] : alignment.teacher_starts[g + 1]])
        assert s == t == span, (name, g, s, t, span)
        previous = alignment.byte_ends[g]
    assert previous == len(text_bytes)
    assert alignment.groups >= min(len(student[0]), len(teacher[0])) // 4  # aligned often, not once at the end


def test_zero_width_tokens_pair_in_order_and_an_eos_only_one_side_has_joins_the_last_group():
    # BOS (end 0), "ab" | "a","b", EOS on the student's side only.
    alignment = align([0, 2, 2], [0, 1, 2])
    assert alignment.byte_ends == (0, 2)
    assert alignment.student_starts == (0, 1, 3) and alignment.teacher_starts == (0, 1, 3)
    assert alignment.student_last() == [0, 2] and alignment.teacher_last() == [0, 2]
    with pytest.raises(ValueError, match="different texts"):
        align([1, 3], [1, 4])


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_identical_tokenizers_give_exactly_the_same_tokenizer_divergence(tokenizers, kind):
    text = TEXTS["digits"] + " " + TEXTS["cjk"]
    ids, ends, _ = _tokens(tokenizers[0], text)
    alignment = align(ends, ends)
    assert alignment.student_starts == tuple(range(len(ids) + 1))  # one token per group
    vocab = len(tokenizers[0])
    student_ids, teacher_ids = shared_vocabulary(*[tokenizers[0].convert_ids_to_tokens(list(range(vocab)))] * 2)
    assert torch.equal(student_ids, torch.arange(vocab))
    torch.manual_seed(0)
    teacher, student = torch.randn(len(ids), vocab) * 3, torch.randn(len(ids), vocab, requires_grad=True)
    d = Divergence(kind=kind, temperature=2.0)
    value = aligned_hybrid(teacher, student, student_ids, teacher_ids, d)
    expected, expected_grad = DIVERGENCES[kind](student.detach().clone(), teacher.clone(), d)
    assert torch.equal(value.detach(), expected)
    value.sum().backward()
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-6, atol=1e-7)
    # Projected: every token is its own longest prefix; through log and exp, the same up to rounding.
    carry = projection(tokenizers[0], tokenizers[0])
    assert torch.equal(carry, torch.arange(vocab))
    student.grad = None
    value = projected(teacher, student, carry, d)
    value.sum().backward()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-4, atol=1e-6)


def _brute_carried(p, student_tok, teacher_tok) -> torch.Tensor:
    """The carried distribution by its definition, one teacher token at a time: its bytes, tokenized by
    the student's BPE, give their first token the probability; special tokens go by name."""
    to_char = {byte: char for char, byte in _byte_decoder().items()}
    out = torch.zeros(len(student_tok))
    for v, data in enumerate(token_bytes(teacher_tok)):
        if data is None:
            name = teacher_tok.convert_ids_to_tokens(v)
            if name in student_tok.all_special_tokens:
                out[student_tok.convert_tokens_to_ids(name)] += p[v]
            continue
        first = student_tok.backend_tokenizer.model.tokenize("".join(to_char[b] for b in data))[0].value
        out[student_tok.convert_tokens_to_ids(first)] += p[v]
    return out / out.sum()


def test_projected_carries_each_teacher_token_to_the_students_first_token_of_its_bytes(tokenizers):
    """Across the 300- and 600-token tokenizers: each teacher token goes to the first token of the
    student's BPE of its bytes (which spells a prefix of them), special tokens by name; the term is
    forward KL between that carried distribution and the student's (autograd's value and gradient)."""
    student_tok, teacher_tok = tokenizers
    carry = projection(student_tok, teacher_tok)
    student_bytes = token_bytes(student_tok)
    for data, s in zip(token_bytes(teacher_tok), carry.tolist(), strict=True):
        assert s >= 0 and (data is None or data.startswith(student_bytes[s]))
    assert len(set(carry.tolist())) > len(student_tok) // 2
    torch.manual_seed(4)
    teacher = torch.randn(6, len(teacher_tok)) * 2
    student = torch.randn(6, len(student_tok), requires_grad=True)
    value = projected(teacher, student, carry, Divergence(kind="forward_kl", temperature=2.0))
    value.sum().backward()
    p = (teacher / 2).softmax(-1)
    target = torch.stack([_brute_carried(row, student_tok, teacher_tok) for row in p])
    reference_student = student.detach().clone().requires_grad_(True)
    log_q = (reference_student / 2).log_softmax(-1)
    reference = 4 * (target * (target.clamp(min=1e-30).log() - log_q)).sum(-1)
    reference.sum().backward()
    torch.testing.assert_close(value.detach(), reference.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-6)


def test_sentencepiece_tokens_meet_byte_level_ones_by_their_bytes(tokenizers, sentencepiece):
    """ "▁the" and "Ġthe" are one shared token; a SentencePiece tokenizer against itself shares every token
    and its aligned term is exactly the same-tokenizer divergence; `projected` carries each teacher token
    to a student token that spells a prefix of its bytes (a split character: its first byte's token)."""
    bpe = tokenizers[0]
    student_ids, teacher_ids = shared_vocabulary(vocabulary_keys(sentencepiece), vocabulary_keys(bpe))
    names = dict(zip(teacher_ids.tolist(), student_ids.tolist(), strict=True))
    the = bpe.convert_tokens_to_ids("\u0120the")
    assert sentencepiece.convert_ids_to_tokens(names[the]) == "\u2581the"
    vocab = len(sentencepiece)
    student_ids, teacher_ids = shared_vocabulary(*[vocabulary_keys(sentencepiece)] * 2)
    assert torch.equal(student_ids, torch.arange(vocab)) and torch.equal(teacher_ids, torch.arange(vocab))
    torch.manual_seed(2)
    teacher, student = torch.randn(7, vocab) * 3, torch.randn(7, vocab)
    d = Divergence(kind="forward_kl", temperature=2.0)
    expected, _ = DIVERGENCES["forward_kl"](student.clone(), teacher.clone(), d)
    assert torch.equal(aligned_hybrid(teacher, student, student_ids, teacher_ids, d), expected)
    for student_tok, teacher_tok in ((sentencepiece, bpe), (bpe, sentencepiece)):
        student_bytes = token_bytes(student_tok)
        for data, s in zip(token_bytes(teacher_tok), projection(student_tok, teacher_tok).tolist(), strict=True):
            assert s >= 0 and (data is None or (student_bytes[s] and data.startswith(student_bytes[s]))), data


def test_a_tokenizer_that_rewrites_the_text_is_refused(sentencepiece, tmp_path):
    """A normalizer other than SentencePiece's "▁" for a space (NFKC here), or no byte fallback: the tokens
    no longer spell the text's bytes, and the teacher and student cannot be aligned on them."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    assert spelling(sentencepiece) == "metaspace"
    rewriting = PreTrainedTokenizerFast(tokenizer_object=sentencepiece.backend_tokenizer)
    rewriting.backend_tokenizer.normalizer = normalizers.NFKC()
    assert spelling(rewriting) is None and byte_lengths(rewriting, [5]) is None
    saved = json.loads(sentencepiece.backend_tokenizer.to_str())
    saved["model"]["byte_fallback"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    assert spelling(PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))) is None


def test_sorted_l1_and_positional_uld_ignore_token_identity_and_train_the_student():
    torch.manual_seed(1)
    teacher = torch.randn(5, 40)
    student = teacher[:, torch.randperm(40)].clone()  # the same distributions, other token ids
    assert positional_uld(teacher, student).abs().max() < 1e-6
    wider = torch.cat([student, torch.full((5, 10), -1e4)], dim=1)  # padded columns: zero probability
    assert positional_uld(teacher, wider).abs().max() < 1e-6
    assert positional_uld(teacher[:3], student).shape == (3,)  # paired by index, the shorter decides
    other = torch.randn(5, 30, requires_grad=True)
    loss = aligned_hybrid(teacher, other, torch.tensor([0, 1]), torch.tensor([2, 3]), Divergence())
    loss.sum().backward()
    assert torch.isfinite(other.grad).all() and other.grad.abs().sum() > 0
    p, q = teacher.softmax(-1), other.detach().softmax(-1)
    assert (sorted_l1(p, q) <= 2 + 1e-6).all()


@pytest.mark.parametrize("name", ["ascii", "digits", "whitespace", "cjk"])
def test_character_offsets_give_the_same_ends_where_no_character_is_split(tokenizers, name):
    """Tokenizers that are not byte-level fall back on character offsets: on text whose characters
    are never split across tokens the ends are the same as from the exact byte lengths."""
    text = TEXTS[name]
    for tokenizer in tokenizers:
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        exact = byte_ends(text, encoded["offset_mapping"], byte_lengths(tokenizer, encoded["input_ids"]))
        if len(set(encoded["offset_mapping"])) == len(encoded["offset_mapping"]):
            assert byte_ends(text, encoded["offset_mapping"]) == exact


def _student_rows(tokenizer, texts: list[str]):
    """Rows as the token store writes them: BOS + the text's tokens + EOS, every token a target."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for t in texts
    ]
    mask = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.bool)
    for r, ids in enumerate(rows):
        mask[r, 1 : len(ids)] = True
    return rows, mask


def test_teacher_rows_of_the_same_tokenizer_are_the_student_rows_paired_position_by_position(tokenizers):
    tokenizer = tokenizers[0]
    rows, mask = _student_rows(tokenizer, [TEXTS["ascii"], TEXTS["emoji"], TEXTS["digits"]])
    for pairing in ("aligned", "positional"):
        teacher = teacher_rows(rows, mask, tokenizer, tokenizer, pairing)
        for r, ids in enumerate(rows):
            assert teacher.input_ids[r, : len(ids)].tolist() == ids
        valid = mask[:, 1:].nonzero()  # (row, t): position t predicts the target t + 1
        assert torch.equal(teacher.student, valid) and torch.equal(teacher.teacher, valid), pairing
        assert teacher.unaligned_rows == 0


def test_teacher_rows_of_another_tokenizer_pair_positions_that_have_read_the_same_bytes(pair):
    """The student's row and the teacher's have read the same bytes at each pair (a SentencePiece
    tokenizer's dummy prefix aside: the student's is a space the teacher reads, the teacher's none)."""
    student_tok, teacher_tok = pair
    texts = list(TEXTS.values())
    rows, mask = _student_rows(student_tok, texts)
    teacher = teacher_rows(rows, mask, student_tok, teacher_tok)

    def prefix(tokenizer, ids):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        spelled = b"".join(_spelled(tokenizer, t) for t in tokens if t not in tokenizer.all_special_tokens)
        return spelled.removeprefix(b" ")

    assert len(teacher.student) > sum(len(r) for r in rows) // 3
    for (row, s), (row_t, t) in zip(teacher.student.tolist(), teacher.teacher.tolist(), strict=True):
        assert row == row_t and mask[row, s + 1]
        assert prefix(student_tok, rows[row][: s + 1]) == prefix(teacher_tok, teacher.input_ids[row, : t + 1].tolist())
    assert teacher.input_ids[0, 0] == teacher_tok.bos_token_id


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_the_term_across_identical_tokenizers_is_the_same_tokenizer_soft_term(tokenizers, kind):
    """Per row, value and gradient: cross_divergence over the aligned pairs (chunked, recomputed in
    backward) against the trainer's own soft term on the same logits."""
    from vkd_ds.losses import divergence_per_sequence

    tokenizer = tokenizers[0]
    rows, mask = _student_rows(tokenizer, [TEXTS["ascii"], TEXTS["cjk"], TEXTS["whitespace"]])
    teacher = teacher_rows(rows, mask, tokenizer, tokenizer)
    vocab = len(tokenizer)
    shared = shared_vocabulary(*[tokenizer.convert_ids_to_tokens(list(range(vocab)))] * 2)
    torch.manual_seed(2)
    student_logits = torch.randn(len(rows), mask.shape[1], vocab + 8, requires_grad=True)  # padded head
    teacher_logits = torch.randn(len(rows), teacher.input_ids.shape[1], vocab + 3) * 2
    d = Divergence(kind=kind, temperature=2.0)
    pairs = (teacher.student, teacher.teacher)
    value = cross_divergence(student_logits, teacher_logits, pairs, d, shared, (vocab, vocab), chunk_tokens=7)
    (grad,) = torch.autograd.grad(value.sum(), student_logits)
    positions = torch.zeros_like(mask)
    positions[:, :-1] = mask[:, 1:]  # position t predicts the target t + 1
    reference = divergence_per_sequence(student_logits, teacher_logits[..., :vocab], positions, d, vocab, 16)
    (reference_grad,) = torch.autograd.grad(reference.sum(), student_logits)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)


def _cached(teacher_logits: torch.Tensor, at: torch.Tensor, vocab: int, k: int, temperature: float):
    """A teacher cache's rows (teacher_cache.teacher_rows: top-k, tail) of the logits at positions `at`."""
    from vkd_ds.losses import SparseTeacher
    from vkd_ds.teacher_cache import teacher_rows as cache_rows

    picked = teacher_logits[at[:, 0], at[:, 1]][None]
    mask = torch.ones(picked.shape[:2], dtype=torch.bool)
    rows = cache_rows(picked, torch.zeros_like(mask, dtype=torch.long), mask, vocab, k, temperature)
    return SparseTeacher(rows["ids"], rows["logp"], rows["tail"], temperature)


@pytest.mark.parametrize("pairing", ["projected", "aligned", "positional"])
def test_a_teacher_cache_at_k_equal_to_the_vocabulary_gives_the_live_teachers_term(tokenizers, pairing):
    """The cache holds every teacher token; the pairs pick its rows. At k = V_T the term and its
    gradient are the live teacher's (at T = 2, and positional ULD's T = 1); below V_T the top-k
    probabilities come back exactly and the tail keeps its mass."""
    student_tok, teacher_tok = tokenizers
    rows, mask = _student_rows(student_tok, [TEXTS["ascii"], TEXTS["digits"], TEXTS["emoji"]])
    teacher = teacher_rows(rows, mask, student_tok, teacher_tok, "positional" if pairing == "positional" else "aligned")
    vs, vt = len(student_tok), len(teacher_tok)
    shared = carry = None
    if pairing == "aligned":
        shared = shared_vocabulary(*(t.convert_ids_to_tokens(list(range(len(t)))) for t in (student_tok, teacher_tok)))
    if pairing == "projected":
        carry = projection(student_tok, teacher_tok)
    torch.manual_seed(3)
    student_logits = torch.randn(len(rows), mask.shape[1], vs, requires_grad=True)
    teacher_logits = torch.randn(len(rows), teacher.input_ids.shape[1], vt + 5) * 3  # padded head
    d = Divergence(kind="forward_kl", temperature=2.0)
    pairs = (teacher.student, teacher.teacher)
    live = cross_divergence(student_logits, teacher_logits, pairs, d, shared, (vs, vt), 5, carry)
    cached_teacher = _cached(teacher_logits, teacher.teacher, vt, vt, 2.0)
    cached = cross_divergence(student_logits, cached_teacher, pairs, d, shared, (vs, vt), 5, carry)
    (live_grad,) = torch.autograd.grad(live.sum(), student_logits)
    (cached_grad,) = torch.autograd.grad(cached.sum(), student_logits)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_grad, live_grad, rtol=1e-4, atol=1e-7)
    top = _cached(teacher_logits, teacher.teacher, vt, 16, 2.0)
    dense = (sparse_logits(top, slice(0, len(top)), vt) / 2.0).softmax(-1)
    exact = (teacher_logits[teacher.teacher[:, 0], teacher.teacher[:, 1], :vt] / 2.0).softmax(-1)
    torch.testing.assert_close(dense.gather(1, top.ids), exact.gather(1, top.ids), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense.sum(-1), torch.ones(len(top)), rtol=1e-5, atol=1e-6)
