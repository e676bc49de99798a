"""JSONL parsing, masks and the resumable global-batch sampler (the token store: test_token_store.py)."""

import json

import pytest
import torch

from vkd_ds.corpus import load_examples, read_jsonl
from vkd_ds.data import (
    GlobalBatchSampler,
    collate,
    eval_shards,
    global_batch_order,
    rank_rows,
)
from vkd_ds.errors import VkdError
from vkd_ds.models import load_tokenizer
from vkd_ds.token_store import open_split


def store_of(path, tokenizer, max_seq_len, tmp_path):
    return open_split(str(path), "data.train_path", tokenizer, max_seq_len, str(tmp_path / "stores"))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "fine"}', "", '{"text": "broken"'])
    with pytest.raises(VkdError, match=r"d\.jsonl:3: malformed JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ('["a list"]', "must be a JSON object"),
        ('{"txt": "typo"}', 'a record needs one of "text"'),
        ('{"text": "a", "prompt": "b", "completion": "c"}', 'a record needs one of "text"'),
        ('{"prompt": "only a prompt"}', '"completion" must be a string'),
        ('{"text": 5}', '"text" must be a string'),
    ],
)
def test_bad_records(tmp_path, record, message):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "fine"}', record])
    with pytest.raises(VkdError, match=rf"d\.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(VkdError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(VkdError, match="holds no records"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def test_a_byte_order_mark_is_read_and_later_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    assert [record["text"] for _, record in read_jsonl(path)] == ["first", "second"]
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n\n{"text": "broken"\n')
    with pytest.raises(VkdError, match=r"bom\.jsonl:3: malformed JSON"):
        read_jsonl(path)
    # A byte-order mark anywhere but the start of the file is not one.
    path.write_bytes(b'{"text": "first"}\n\xef\xbb\xbf{"text": "second"}\n')
    with pytest.raises(VkdError, match=r"bom\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_empty_records_are_skipped_and_counted_and_a_file_of_them_refused(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(str(tiny_assets / "tokenizer"))
    lines = [
        json.dumps({"text": "The list type"}),
        json.dumps({"text": "   "}),
        json.dumps({"prompt": "", "completion": ""}),
        json.dumps({"prompt": "The", "completion": ""}),  # EOS is still a target
    ]
    data = store_of(write_lines(tmp_path / "d.jsonl", lines), tokenizer, 64, tmp_path)
    assert len(data) == 2 and data.manifest["counts"]["skipped"]["empty"] == [2, f"{tmp_path / 'd.jsonl'}:2"]
    assert f"skipped 2 record(s) with empty text (first: {tmp_path / 'd.jsonl'}:2)" in data.notes()[0]
    with pytest.raises(VkdError, match=r"no record with text to train on \(skipped 2 record\(s\) with empty text"):
        store_of(write_lines(tmp_path / "e.jsonl", lines[1:3]), tokenizer, 64, tmp_path)


def test_prompt_only_records_after_truncation_are_counted(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(str(tiny_assets / "tokenizer"))
    long_prompt = " ".join(["The list type"] * 20)
    lines = [json.dumps({"prompt": long_prompt, "completion": " type"}), json.dumps({"text": "The list type"})]
    data = store_of(write_lines(tmp_path / "d.jsonl", lines), tokenizer, 8, tmp_path)
    assert data.manifest["counts"]["skipped"]["prompt_only"] == [1, f"{tmp_path / 'd.jsonl'}:1"]
    assert not any(data[0].loss_mask) and any(data[1].loss_mask)
    assert any("no target token" in note for note in data.notes())
    # The pair was also longer than the row: cut, and counted with its dropped tokens.
    assert any("cut 1 prompt/completion or messages record(s)" in note for note in data.notes())
    assert store_of(write_lines(tmp_path / "ok.jsonl", lines[1:]), tokenizer, 8, tmp_path).notes() == []


def test_prompt_completion_masks_the_prompt(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(str(tiny_assets / "tokenizer"))
    path = write_lines(
        tmp_path / "d.jsonl",
        [json.dumps({"prompt": "The list", "completion": " type"}), json.dumps({"text": "The list type"})],
    )
    pair, text = load_examples(path, tokenizer, max_seq_len=64)
    prompt_len = 1 + len(tokenizer.encode("The list", add_special_tokens=False))
    assert pair.loss_mask[:prompt_len] == [0] * prompt_len
    assert all(pair.loss_mask[prompt_len:]) and pair.input_ids[-1] == tokenizer.eos_token_id
    assert text.loss_mask[0] == 0 and all(text.loss_mask[1:])
    batch = collate([pair, text], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(pair.input_ids), len(text.input_ids)))
    assert batch["loss_mask"].sum() == sum(pair.loss_mask) + sum(text.loss_mask)


def test_a_long_text_becomes_windows_in_memory_as_in_the_store(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(str(tiny_assets / "tokenizer"))
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "word " * 200})])
    examples = load_examples(path, tokenizer, max_seq_len=16)
    assert len(examples) > 1 and all(len(ex.input_ids) <= 16 for ex in examples)
    stored = store_of(path, tokenizer, 16, tmp_path)
    assert [ex.input_ids for ex in examples] == [ex.input_ids for ex in stored]
    assert [ex.loss_mask for ex in examples] == [ex.loss_mask for ex in stored]


def test_sampler_two_ranks_concatenate_to_one():
    """Rank slices of a micro-step are consecutive: 1 rank with 2b sees exactly what 2 ranks with b see."""
    two = GlobalBatchSampler(50, micro_batch_size=3, grad_accum=2, world_size=2, seed=7)
    one = GlobalBatchSampler(50, micro_batch_size=6, grad_accum=2, world_size=1, seed=7)
    for step in range(12):  # crosses several epoch boundaries
        for micro in range(2):
            assert one.indices(step, micro, 0) == two.indices(step, micro, 0) + two.indices(step, micro, 1)


def test_sampler_is_a_permutation_per_epoch_and_resumable():
    sampler = GlobalBatchSampler(12, micro_batch_size=2, grad_accum=1, world_size=2, seed=3)
    epoch = [i for step in range(3) for rank in range(2) for i in sampler.indices(step, 0, rank)]
    assert sorted(epoch) == list(range(12))
    fresh = GlobalBatchSampler(12, micro_batch_size=2, grad_accum=1, world_size=2, seed=3)
    assert fresh.indices(5, 0, 1) == sampler.indices(5, 0, 1)  # position depends on the step only
    other_seed = GlobalBatchSampler(12, micro_batch_size=2, grad_accum=1, world_size=2, seed=4)
    assert [other_seed.indices(s, 0, 0) for s in range(3)] != [sampler.indices(s, 0, 0) for s in range(3)]


def test_eval_shards_cover_everything_once_with_equal_counts():
    shards = [eval_shards(11, 2, 3, rank, None) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for batch in s for i in batch if i is not None]
    assert sorted(seen) == list(range(11))


@pytest.mark.parametrize("world,accum,micro", [(1, 1, 4), (2, 1, 2), (2, 3, 2), (4, 2, 1), (3, 2, 3)])
def test_global_batch_order_is_the_one_rank_order_and_rank_rows_inverts_it(world, accum, micro):
    """What every rank gathers, put in (micro-step, rank, row) order, is the global batch exactly as
    one rank with micro-batch micro·world holds it, and each rank gets its own rows back."""
    sampler = GlobalBatchSampler(50, micro, accum, world, seed=3)
    one_rank = GlobalBatchSampler(50, micro * world, accum, 1, seed=3)
    step = 2
    per_rank = torch.tensor([[sampler.indices(step, a, r) for a in range(accum)] for r in range(world)])
    ordered = global_batch_order(per_rank)  # [world, accum, micro] -> [G]
    expected = [i for a in range(accum) for i in one_rank.indices(step, a, 0)]
    assert ordered.tolist() == expected
    for r in range(world):
        assert torch.equal(rank_rows(ordered, accum, world, r), per_rank[r])
    # Trailing dimensions ride along (e.g. a row's saliency and its validity).
    pairs = torch.stack([per_rank, -per_rank], dim=-1)
    assert global_batch_order(pairs)[:, 1].tolist() == [-i for i in expected]
    if accum * world > 1:
        with pytest.raises(ValueError):
            rank_rows(ordered[:-1], accum, world, 0)
