"""The teacher's loading path (vkd_ds/teacher_load.py): each rank reads only its ZeRO-3 partition of a
sharded safetensors checkpoint, so no rank ever holds the whole teacher, and the loaded teacher's
logits equal transformers' own load of the same files. 2 real ranks, real DeepSpeed."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import base_overrides, deepspeed_launch, save_tiny_model
from vkd_ds.teacher_load import SafetensorsReader, safetensors_files


def _deep_narrow_teacher(path, **sizes):
    """113 M parameters (455 MB in fp32), nearly all in 64 equal layers: any rank that held the whole
    teacher, or even a quarter of it beyond its share, would show it in its peak resident set."""
    shape = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 64, "num_attention_heads": 4}
    shape.update(sizes)
    save_tiny_model(path, **shape)
    return path


@pytest.fixture(scope="module")
def sharded_teacher(tmp_path_factory):
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("teacher") / "sharded"
    _deep_narrow_teacher(path)
    # Re-save in 80 MB files, as a hub checkpoint comes: the loader walks the index shard by shard.
    model = AutoModelForCausalLM.from_pretrained(path)
    shutil.rmtree(path)
    model.save_pretrained(path, max_shard_size="80MB")
    return path


def _load(tmp_path, assets, teacher, *extra):
    out = tmp_path / "out"
    out.mkdir()
    overrides = [*base_overrides(assets, tmp_path / "unused"), f"teacher.path={teacher}", *extra]
    result = deepspeed_launch(["tests/scripts/teacher_load.py", str(out), *overrides], num_procs=2)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]
    return ranks, torch.load(out / "logits.pt")


def test_no_rank_holds_more_than_its_share_while_loading(sharded_teacher, tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    assert len(safetensors_files(sharded_teacher)) > 3
    ranks, engine = _load(tmp_path, tiny_assets, sharded_teacher)
    total = ranks[0]["total"]
    teacher_bytes = 4 * total
    assert sum(r["local"] for r in ranks) == pytest.approx(total, rel=1e-3)
    for r in ranks:
        share_bytes = 4 * r["local"]
        assert r["local"] <= total / 2 + 1024
        # Its share, plus what building and wrapping one engine costs (one layer gathered, DeepSpeed's
        # buffers): well under the quarter of the teacher that would betray a whole tensor group or
        # file held at once. transformers' own ZeRO-3 load reads every file into rank 0 first.
        assert r["peak_extra"] <= share_bytes + teacher_bytes / 4, (r, teacher_bytes)
    reference = AutoModelForCausalLM.from_pretrained(sharded_teacher)
    with torch.no_grad():
        expected = reference(input_ids=engine["input_ids"]).logits
    torch.testing.assert_close(engine["logits"], expected, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_one_file_and_bf16(tiny_assets, tmp_path):
    """One safetensors file, a tied LM head stored once, loaded into a bf16 engine from fp32 files."""
    from transformers import AutoModelForCausalLM

    teacher = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=3)
    assert [f.name for f in safetensors_files(teacher)] == ["model.safetensors"]
    with SafetensorsReader(teacher / "model.safetensors") as reader:
        assert "lm_head.weight" not in reader.keys()
    _, engine = _load(tmp_path, tiny_assets, teacher, "deepspeed.precision=bf16")
    reference = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(input_ids=engine["input_ids"]).logits.float()
    torch.testing.assert_close(engine["logits"], expected, atol=1e-2, rtol=1e-2)
