"""The teacher's loading path (vkd_ds/teacher_load/): each rank reads only its ZeRO-3 partition of a
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


def _async_io_missing() -> str | None:
    """None once DeepSpeed's async_io op is built (here, in the test's process: its first build takes
    minutes, which the ranks' launch timeout should not have to cover); else why it cannot be."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed's async_io needs libaio (apt-get install libaio-dev; .ci/run installs it)"
    builder.load(verbose=False)
    return None


@pytest.mark.distributed
def test_nvme_offload_loads_swapped_partitions_and_trains_like_cpu_offload(tiny_assets, tmp_path):
    """teacher.offload_param=nvme for real, on this machine's disk (DeepSpeed's async I/O; its first use
    compiles the op, about 5 minutes on 2 cores): the partitions big enough to swap are written
    through the swapper, the logits equal transformers' load, and training matches CPU offload."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import train_job
    from vkd_ds.metrics import read_metrics
    from vkd_ds.terms import only_terms

    missing = _async_io_missing()
    if missing:
        pytest.skip(missing)
    # 512 × 2048 MLP weights: 2 MiB partitions per rank, over DeepSpeed's 1 MiB swap minimum.
    teacher = save_tiny_model(tmp_path / "teacher", hidden_size=512, intermediate_size=2048, num_hidden_layers=2)
    nvme = tmp_path / "nvme"
    ranks, engine = _load(tmp_path, tiny_assets, teacher, "teacher.offload_param=nvme", f"teacher.nvme_path={nvme}")
    assert all(r["nvme_params"] >= 6 for r in ranks), ranks  # gate, up and down of 2 layers at least
    assert all(len(r["nvme_dirs"]) == 2 for r in ranks), ranks  # a swap folder per process, while it runs
    assert not list(nvme.glob("vkd-ds-*"))  # removed when the processes exit
    reference = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        expected = reference(input_ids=engine["input_ids"]).logits
    torch.testing.assert_close(engine["logits"], expected, atol=1e-5, rtol=1e-5)

    losses = {}
    for offload in ("cpu", "nvme"):
        run_dir = tmp_path / f"run_{offload}"
        overrides = [*base_overrides(tiny_assets, run_dir), f"teacher.path={teacher}", *only_terms("ce", "soft")]
        overrides += ["weighting.lam=0", "valence.teacher_head=null", "trainer.max_steps=2"]
        overrides += [f"teacher.offload_param={offload}", f"teacher.nvme_path={nvme}"]
        train_job(overrides)
        losses[offload] = [(r["loss"], r["loss/soft"]) for r in read_metrics(run_dir / "metrics.csv")]
        # startup.json: what each rank held of the teacher (swapped out or not) and when step 1 ended.
        startup = json.loads((run_dir / "startup.json").read_text())
        load = startup["teacher_load"]
        assert sum(r["parameters"] for r in load["ranks"]) == pytest.approx(load["parameters"], rel=1e-3)
        assert all(r["peak_rss_gb"] >= r["rss_before_gb"] > 0 for r in load["ranks"])
        assert startup["first_step"] == 1 and startup["time_to_first_step_s"] > load["seconds"] > 0
    assert losses["nvme"] == losses["cpu"]
