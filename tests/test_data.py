"""JSONL parsing, masks and the resumable global-batch sampler."""

import json

import pytest

from vkd_ds.data import GlobalBatchSampler, collate, eval_shards, load_examples, read_jsonl
from vkd_ds.errors import VkdError
from vkd_ds.models import load_tokenizer


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
        ('{"txt": "typo"}', 'either "text" or "prompt"'),
        ('{"text": "a", "prompt": "b", "completion": "c"}', 'either "text" or "prompt"'),
        ('{"prompt": "only a prompt"}', '"completion" must be a string'),
        ('{"text": 5}', '"text" must be a string'),
        ('{"text": "   "}', '"text" is empty'),
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


def test_truncation(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(str(tiny_assets / "tokenizer"))
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "word " * 200})])
    (example,) = load_examples(path, tokenizer, max_seq_len=16)
    assert len(example.input_ids) == 16


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
