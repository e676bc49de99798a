"""Every checkpoint transformers' own `from_pretrained` takes, loaded by vkd-ds's shard-by-shard teacher
loader (vkd_ds/teacher_load/) on 2 real ranks: MoE teachers whose files hold one tensor per expert
(transformers fuses them on load), a GPT-NeoX teacher (its `embed_out` renamed to `lm_head`), an
older Llama export with per-layer `rotary_emb.inv_freq` (keys transformers ignores), and a sharded
`.bin` teacher (experts split across its shards, a tied embedding stored under both names). The
logits equal transformers' single-process load, and each distills in a real 2-rank vkd-ds run. A
checkpoint with a tensor missing, unexpected or of the wrong shape is refused with its name before
anything starts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import base_overrides, deepspeed_launch, save_tiny_model, train_job
from tests.conftest import vkd_cli_in_process as cli

MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}
QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}
OLMOE = {"num_experts": 4, "num_experts_per_tok": 2, "eos_token_id": 1, "pad_token_id": 2}


def write_bin(source, target, shards: int = 1, tie_both: bool = False, edit=None):
    """`source`'s safetensors checkpoint re-written as `.bin` files (`pytorch_model.bin`, or `shards`
    files with a `pytorch_model.bin.index.json`, keys dealt round-robin so that a layer's experts land
    in different files), as older hub checkpoints come. `tie_both`: the tied LM head stored too, sharing
    the embedding's storage (what torch.save of a tied model's state dict writes). `edit(state)`
    changes the tensors first."""
    from safetensors.torch import load_file

    from vkd_ds.teacher_load import safetensors_files

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    state = {}
    for file in safetensors_files(source):
        state.update(load_file(file))
    if edit is not None:
        edit(state)
    keys = sorted(state)
    groups = [{key: state[key] for key in keys[i::shards]} for i in range(shards)]
    if tie_both:
        group = next(g for g in groups if "model.embed_tokens.weight" in g)
        group["lm_head.weight"] = group["model.embed_tokens.weight"]
    if shards == 1:
        torch.save(groups[0], target / "pytorch_model.bin")
        return target
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(group, target / name)
        weight_map.update(dict.fromkeys(group, name))
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def llama_with_inv_freq(path):
    """A Llama checkpoint as older exports wrote it: a `rotary_emb.inv_freq` buffer per layer."""
    from safetensors.torch import load_file, save_file

    save_tiny_model(path, seed=11)
    weights = load_file(path / "model.safetensors")
    for layer in range(2):
        weights[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    made = {
        "mixtral": save_tiny_model(root / "mixtral", arch="mixtral", seed=1, **MIXTRAL),
        "qwen3_moe": save_tiny_model(root / "qwen3_moe", arch="qwen3_moe", seed=2, **QWEN3_MOE),
        "olmoe": save_tiny_model(root / "olmoe", arch="olmoe", seed=3, **OLMOE),
        "gpt_neox": save_tiny_model(root / "gpt_neox", arch="gpt_neox", seed=4),
        "llama_inv_freq": llama_with_inv_freq(root / "llama_inv_freq"),
    }
    tied = save_tiny_model(root / "qwen3_moe_tied", arch="qwen3_moe", seed=6, tie_word_embeddings=True, **QWEN3_MOE)
    made["qwen3_moe_bin"] = write_bin(tied, root / "qwen3_moe_bin", shards=4, tie_both=True)
    return made


def test_the_files_hold_what_transformers_converts(teachers):
    """The fixtures are the cases: per-expert tensors, a legacy name, ignored keys, sharded .bin."""
    from safetensors import safe_open

    def keys(name):
        with safe_open(teachers[name] / "model.safetensors", "pt") as handle:
            return set(handle.keys())

    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys("mixtral")
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys("qwen3_moe")
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in keys("olmoe")
    assert "embed_out.weight" in keys("gpt_neox")
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in keys("llama_inv_freq")
    index = json.loads((teachers["qwen3_moe_bin"] / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 4 and index["lm_head.weight"] == index["model.embed_tokens.weight"]
    experts = {index[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(4)}
    assert len(experts) > 1  # one fused parameter built from tensors of several files
    assert not list(teachers["qwen3_moe_bin"].glob("*.safetensors"))


@pytest.mark.distributed
def test_every_format_loads_on_two_ranks_with_transformers_logits(teachers, tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    out.mkdir()
    paths = [str(path) for path in teachers.values()]
    overrides = base_overrides(tiny_assets, tmp_path / "unused")
    result = deepspeed_launch(["tests/scripts/teacher_formats.py", str(out), ",".join(paths), *overrides], 2)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]
    loaded = torch.load(out / "logits.pt")
    for name, path in teachers.items():
        held = [rank[str(path)] for rank in ranks]
        total = held[0]["total"]
        assert sum(h["local"] for h in held) == pytest.approx(total, rel=0.01), name  # each its share, no more
        assert all(h["local"] <= total / 2 + 64 for h in held), (name, held)
        reference = AutoModelForCausalLM.from_pretrained(path)  # transformers' own load, one process
        with torch.no_grad():
            expected = reference(input_ids=loaded["input_ids"]).logits
        difference = (loaded[str(path)] - expected).abs().max().item()
        assert difference <= 1e-5, (name, difference)


@pytest.mark.distributed
@pytest.mark.parametrize("teacher", ["qwen3_moe_bin", "mixtral", "qwen3_moe", "olmoe", "gpt_neox", "llama_inv_freq"])
def test_every_format_distills(teacher, teachers, tiny_assets, tmp_path):
    """A real 2-rank vkd-ds run with each teacher of the logits test: it trains, soft KD included."""
    import math

    from vkd_ds.metrics import read_metrics
    from vkd_ds.terms import only_terms

    run_dir = tmp_path / "run"
    overrides = [*base_overrides(tiny_assets, run_dir), f"teacher.path={teachers[teacher]}"]
    overrides += [*only_terms("ce", "soft"), "weighting.lam=0", "valence.teacher_head=null", "trainer.max_steps=3"]
    train_job(overrides)
    rows = read_metrics(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss/soft"])) and float(r["loss/soft"]) > 0 for r in rows), rows


def _drop(key):
    return lambda state: state.pop(key)


def _add(key):
    return lambda state: state.__setitem__(key, torch.zeros(4))


def _cut(key):
    return lambda state: state.__setitem__(key, state[key][:-1])


@pytest.mark.parametrize(
    "arch, fmt, edit, message",
    [
        (
            "llama",
            "bin",
            _drop("model.layers.1.mlp.up_proj.weight"),
            "lacks 1 parameter(s): model.layers.1.mlp.up_proj.weight",
        ),
        (
            "llama",
            "bin",
            _add("model.layers.0.mlp.extra.weight"),
            "pytorch_model.bin holds 'model.layers.0.mlp.extra.weight', which the model built from its config lacks",
        ),
        (
            "llama",
            "bin",
            _cut("model.layers.1.mlp.down_proj.weight"),
            "pytorch_model.bin holds 'model.layers.1.mlp.down_proj.weight' with shape [31, 64], "
            "the model's is [32, 64]",
        ),
        (
            "mixtral",
            "safetensors",
            _drop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
            "lacks 1 tensor(s): model.layers.1.block_sparse_moe.experts.2.w3.weight, which transformers merges with "
            "the 7 found into 'model.layers.1.mlp.experts.gate_up_proj'",
        ),
        (
            "mixtral",
            "bin",
            _drop("model.layers.0.block_sparse_moe.experts.0.w2.weight"),
            "lacks 1 tensor(s): model.layers.0.block_sparse_moe.experts.0.w2.weight, which transformers merges with "
            "the 3 found into 'model.layers.0.mlp.experts.down_proj'",
        ),
        (
            "mixtral",
            "safetensors",
            _cut("model.layers.0.block_sparse_moe.experts.1.w2.weight"),
            "model.safetensors holds 'model.layers.0.block_sparse_moe.experts.1.w2.weight' with shape [31, 64], where "
            "the other 3 like it that transformers merges into 'model.layers.0.mlp.experts.down_proj' have [32, 64]",
        ),
    ],
    ids=["bin-missing", "bin-unexpected", "bin-misshaped", "moe-missing", "moe-bin-missing", "moe-misshaped"],
)
def test_a_checkpoint_with_a_tensor_missing_unexpected_or_misshaped_is_refused(
    arch, fmt, edit, message, tiny_assets, tmp_path
):
    """Refused by `vkd-ds train` from the files' headers (a `.bin` unpickled onto the meta device),
    before any process starts: one line naming the tensor and the file."""
    from safetensors.torch import load_file, save_file

    extra = MIXTRAL if arch == "mixtral" else {}
    source = save_tiny_model(tmp_path / "source", arch=arch, **extra)
    if fmt == "bin":
        teacher = write_bin(source, tmp_path / "teacher", edit=edit)
    else:
        teacher = source
        weights = load_file(teacher / "model.safetensors")
        edit(weights)
        save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={teacher}"])
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vkd-ds: error: teacher.path:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_keys_transformers_ignores_pass_and_no_weights_is_one_error(teachers, tmp_path):
    """The per-layer inv_freq keys pass the check (transformers ignores them); a directory with a config
    but neither safetensors nor `.bin` weights is refused when the teacher is built, before zero.Init."""
    from vkd_ds.errors import VkdError
    from vkd_ds.models import load_model_config
    from vkd_ds.teacher_load import build_teacher_model, check_checkpoint

    path = teachers["llama_inv_freq"]
    assert check_checkpoint(load_model_config(str(path), "teacher.path"), path).parameters > 0
    empty = tmp_path / "no_weights"
    shutil.copytree(path, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(VkdError, match=r"^teacher.path: .*no_weights holds no weights transformers loads: none of"):
        build_teacher_model(str(empty), {}, torch.float32, {})
