"""Bad input: one clear message naming the problem and where, exit status 2, no traceback,
and no run directory written.

Checks that fail before any process starts run `vkd_ds.cli.main` in this process (the command's own
code path); a few run the real command, and the checks that only ranks can make (a checkpoint's
files) run through the deepspeed launcher."""

import json
import shutil

import pytest

from tests.conftest import base_overrides, deepspeed_launch, train_job, vkd_cli
from tests.conftest import vkd_cli_in_process as cli
from vkd_ds import checkpoint


def assert_clean_failure(result, message, run_dir):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("vkd-ds: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.fixture
def malformed_data(tiny_assets, tmp_path):
    lines = (tiny_assets / "train.jsonl").read_text().splitlines()[:4]
    lines[2] = lines[2][:-5]  # cut the closing quote and brace
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("key", ["teacher.path", "student.path", "data.tokenizer_path"])
def test_missing_model_or_tokenizer_directory(key, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"{key}={tmp_path / 'nothing_here'}"])
    assert_clean_failure(result, f"{key}: directory not found: {tmp_path / 'nothing_here'}", run_dir)


def test_malformed_jsonl_line(tiny_assets, tmp_path, malformed_data):
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"data.train_path={malformed_data}"])
    assert_clean_failure(result, f"{malformed_data}:3: malformed JSON", run_dir)


@pytest.mark.distributed
def test_malformed_jsonl_through_the_deepspeed_launcher(tiny_assets, tmp_path, malformed_data):
    """The same check on the `deepspeed launcher/train.py` path: rank 0 reports, once."""
    run_dir = tmp_path / "run"
    result = deepspeed_launch(
        ["launcher/train.py", *base_overrides(tiny_assets, run_dir), f"data.train_path={malformed_data}"], num_procs=2
    )
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "vkd-ds: error:" in line]
    assert len(errors) == 1 and f"{malformed_data}:3: malformed JSON" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()


def test_vocabulary_mismatch(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from vkd_ds.assets import llama_config

    small = tmp_path / "small_teacher"
    AutoModelForCausalLM.from_config(llama_config(100, 16, 1)).save_pretrained(small)
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={small}"])
    assert_clean_failure(result, "vocabulary mismatch: the tokenizer has 384 tokens but the teacher", run_dir)


def test_student_with_a_different_tokenizer(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.assets import llama_config, pydoc_records, train_tokenizer

    other = train_tokenizer(pydoc_records()[-50:], 300, tmp_path / "other_tok")
    student = tmp_path / "student"
    AutoModelForCausalLM.from_config(llama_config(512, 16, 1)).save_pretrained(student)
    other.save_pretrained(student)
    assert len(AutoTokenizer.from_pretrained(student)) != 384
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"student.path={student}"])
    assert_clean_failure(result, "vocabulary mismatch: the student at", run_dir)


def test_global_batch_inconsistent_with_world_size(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        [
            "train",
            *base_overrides(tiny_assets, run_dir),
            "trainer.micro_batch_size=4",
            "trainer.grad_accum=2",
            "trainer.global_batch_size=12",
            "num_procs=2",
        ]
    )
    assert_clean_failure(
        result,
        "trainer.global_batch_size=12 does not match trainer.micro_batch_size (4) "
        "x trainer.grad_accum (2) x world size (2) = 16",
        run_dir,
    )


@pytest.mark.distributed
def test_unknown_key(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), "trainer.max_stpes=3"])
    assert_clean_failure(result, "bad config override", run_dir)


def test_export_of_a_directory_without_checkpoints(tmp_path):
    result = cli(["export", str(tmp_path), str(tmp_path / "out")])
    assert_clean_failure(result, "holds no complete checkpoint", tmp_path / "out")


@pytest.mark.distributed
def test_cfg_job_prints_the_resolved_config(tiny_assets, tmp_path):
    result = vkd_cli(["train", "--cfg", "job", *base_overrides(tiny_assets, tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert f"path: {tiny_assets / 'teacher'}" in result.stdout and "temperature: 4.0" in result.stdout
    assert not (tmp_path / "run").exists()


def test_non_utf8_or_binary_data_is_reported(tiny_assets, tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n\xff\xfe\x00garbage\n")
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"data.train_path={path}"])
    assert_clean_failure(result, f"{path}:2: ", run_dir)


def _data_with(tiny_assets, tmp_path, line_no: int, record: dict):
    lines = (tiny_assets / "train.jsonl").read_text().splitlines()[:5]
    lines[line_no - 1] = json.dumps(record)
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["feat.layer_map=[[0,7]]"], "`feat.layer_map`: teacher layer 7 does not exist (the teacher has 3)"),
        (["feat.layer_map=[[5,0]]"], "`feat.layer_map`: student layer 5 does not exist (the student has 2)"),
        (["feat.layer_map=[[0,1],[0,2]]"], "`feat.layer_map`: a student layer appears more than once"),
        (
            ["feat.projectors=false"],
            "feat.projectors=false but the student's width (32) differs from the teacher's (48)",
        ),
    ],
)
def test_impossible_feature_settings(tiny_assets, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), *extra])
    assert_clean_failure(result, message, run_dir)


@pytest.mark.parametrize(
    "valence, message",
    [
        ("NaN", ':3: "valence" is not finite (nan)'),
        ([0.5, "Infinity"], ':3: "valence"[1] is not finite (inf)'),
        (1.5, ':3: "valence" = 1.5 is outside [0, 1]'),
        ([0.2, -0.1], ':3: "valence"[1] = -0.1 is outside [0, 1]'),
        ("high", ':3: "valence" must be a number in [0, 1]'),
        ([0.5, 0.5, 0.5], ':3: "valence" has 3 values but the text has'),
    ],
)
def test_bad_valence_labels(tiny_assets, tmp_path, valence, message):
    record = {"text": "The quick brown fox jumps over the lazy dog again and again."}
    value = valence
    if valence in ("NaN",):
        value = float("nan")
    elif isinstance(valence, list) and "Infinity" in valence:
        value = [0.5, float("inf")]
    record["valence"] = value
    data = _data_with(tiny_assets, tmp_path, 3, record)
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"data.train_path={data}"])
    assert_clean_failure(result, f"{data}{message}", run_dir)


def test_teacher_valence_head_of_the_wrong_shape(tiny_assets, tmp_path):
    from vkd_ds.valence import ValenceHead, save_head

    head = save_head(ValenceHead(48, 4), tmp_path / "k4.safetensors")
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"valence.teacher_head={head}"])
    assert_clean_failure(result, "predicts k=4 steps but valence.k=8", run_dir)
    not_a_head = tmp_path / "junk.safetensors"
    not_a_head.write_bytes(b"not safetensors at all")
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"valence.teacher_head={not_a_head}"])
    assert_clean_failure(result, "is not a safetensors file", run_dir)


def test_fit_valence_head_with_unlabelled_data_and_labels_data(tiny_assets, tmp_path):
    out = tmp_path / "head.safetensors"
    result = cli(
        [
            "fit-valence-head",
            f"teacher.path={tiny_assets / 'teacher'}",
            f"data.train_path={tiny_assets / 'train.jsonl'}",
            f"data.tokenizer_path={tiny_assets / 'tokenizer'}",
            "valence.fit.labels=data",
            f"valence.fit.out={out}",
        ]
    )
    assert_clean_failure(result, f"{tiny_assets / 'train.jsonl'}:1: valence.fit.labels=data but this record", out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gate.mode=proxy", "loss.val=0"], "gate.mode=proxy projects the student's valence"),
        (["gate.warmup_steps=-1"], "config key `gate.warmup_steps` must be >= 0, got -1"),
        (["gate.arm_mse=0"], "config key `gate.arm_mse` must be > 0.0, got 0"),
        (["gate.arm_mse=-0.01"], "config key `gate.arm_mse` must be > 0.0, got -0.01"),
        (
            ["deepspeed.offload_optimizer=nvme", "deepspeed.nvme_path=/tmp"],
            "gate.enabled=true with deepspeed.offload_optimizer=nvme: the mercy gate reverts",
        ),
    ],
    ids=["proxy-without-student-head", "negative-warmup", "zero-arm-mse", "negative-arm-mse", "nvme-optimizer"],
)
def test_impossible_gate_settings(overrides, message, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), "gate.enabled=true", *overrides])
    assert_clean_failure(result, message, run_dir)


@pytest.mark.distributed
def test_a_gate_probe_smaller_than_the_world_is_refused_by_the_ranks(tiny_assets, tmp_path):
    """The world size is the launcher's: the ranks refuse it, before anything is written."""
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), "gate.enabled=true", "gate.probe_size=1"])
    assert_clean_failure(result, "`gate.probe_size` (1) must be at least the world size (2)", run_dir)


@pytest.fixture
def teacher_copy(tiny_assets, tmp_path):
    target = tmp_path / "teacher_copy"
    shutil.copytree(tiny_assets / "teacher", target)
    return target


def test_a_teacher_checkpoint_that_does_not_match_its_config(teacher_copy, tiny_assets, tmp_path):
    """Read from the safetensors headers before any process starts: a missing tensor, a wrong shape."""
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    weights = load_file(teacher_copy / "model.safetensors")
    up = weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, teacher_copy / "model.safetensors", metadata={"format": "pt"})
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={teacher_copy}"])
    assert_clean_failure(result, "lacks 1 parameter(s): model.layers.1.mlp.up_proj.weight", run_dir)
    weights["model.layers.1.mlp.up_proj.weight"] = up[:-1]
    save_file(weights, teacher_copy / "model.safetensors", metadata={"format": "pt"})
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={teacher_copy}"])
    assert_clean_failure(result, "holds 'model.layers.1.mlp.up_proj.weight' with shape", run_dir)


@pytest.fixture
def huge_teacher(teacher_copy):
    """The tiny teacher's config grown to ~300 B parameters (1.1 TiB in fp32), with no weights: the
    estimate is made from the config, before a byte of them would be read."""
    config = json.loads((teacher_copy / "config.json").read_text())
    config.update(hidden_size=12288, intermediate_size=49152, num_hidden_layers=160, num_attention_heads=96)
    config["num_key_value_heads"] = 96
    (teacher_copy / "config.json").write_text(json.dumps(config))
    (teacher_copy / "model.safetensors").unlink()
    return teacher_copy


@pytest.mark.distributed
@pytest.mark.parametrize("route", ["vkd-ds train", "ranks"])
def test_a_teacher_too_large_for_this_machine_is_refused_with_numbers(route, huge_teacher, tiny_assets, tmp_path):
    """Refused by `vkd-ds train` before it starts any rank, and by the ranks themselves (under SLURM
    they are started without it) before they load anything: the numbers, not an OOM kill."""
    run_dir = tmp_path / "run"
    from vkd_ds.terms import only_terms

    # CE + soft KD: no teacher valence head, whose width would be refused first.
    overrides = [*base_overrides(tiny_assets, run_dir), f"teacher.path={huge_teacher}"]
    overrides += [*only_terms("ce", "soft"), "weighting.lam=0", "valence.teacher_head=null"]
    if route == "ranks":
        result = deepspeed_launch(["launcher/train.py", *overrides], num_procs=2)
        assert result.returncode != 0 and not run_dir.exists()
        assert "Traceback" not in result.stderr
        output = result.stdout + result.stderr
        assert "teacher.path: the teacher does not fit" in output, output[-3000:]
        return
    result = vkd_cli(["train", *overrides])
    assert_clean_failure(
        result, "teacher.path: the teacher does not fit: 298,983,763,968 parameters are 1113.80 GiB", run_dir
    )
    for number in ("GiB at 4 bytes each", "over 2 rank(s)", "this node's 2 rank(s) hold", "available there"):
        assert number in result.stderr


def test_eval_and_report_of_a_directory_that_is_not_a_run(tmp_path):
    for command, message in (("eval", "has no config.yaml"), ("report", "has no metrics.csv")):
        result = cli([command, str(tmp_path)])
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.fixture(scope="module")
def trained_run(tiny_assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = base_overrides(tiny_assets, run_dir) + ["trainer.max_steps=2", "trainer.eval_every=0"]
    train_job(overrides)
    return run_dir, overrides


def tree(path):
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()}


@pytest.mark.distributed
def test_bad_checkpoints_are_refused_before_anything_is_written(trained_run, tmp_path):
    run_dir, overrides = trained_run
    step = run_dir / "checkpoints" / "step_0000002"
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    shard = damaged / "checkpoints" / "step_0000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    cases = [
        ([f"resume={run_dir / 'checkpoints'}"], run_dir, f"{run_dir / 'checkpoints'} is not a complete vkd-ds"),
        (["resume=never"], run_dir, f"resume=never but {run_dir} already holds checkpoints"),
        (["trainer.micro_batch_size=2"], run_dir, "was trained with a global batch of 8 sequences, this run has 4"),
        (
            [f"run.dir={damaged}"],
            damaged,
            "is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes",
        ),
    ]
    for extra, where, message in cases:
        before = tree(where)
        result = vkd_cli(["train", *overrides, *extra])
        assert result.returncode == 2, (extra, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("vkd-ds: error:")]
        assert len(errors) == 1 and message in errors[0], (extra, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        assert tree(where) == before, extra  # nothing written, nothing removed
    assert (step / checkpoint.COMPLETE).is_file()


@pytest.fixture
def teacher_with_bad_sizes(tiny_assets, tmp_path):
    """The tiny teacher with a config.json whose width is not a multiple of its head count."""
    teacher = tmp_path / "bad_teacher"
    shutil.copytree(tiny_assets / "teacher", teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_size=50, num_attention_heads=4)
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["student.config.hidden_size=130", "student.config.num_attention_heads=4"],
            "student.config: transformers rejects it: The hidden size (130) is not a multiple of the number of "
            "attention heads (4)",
        ),
        (["student.config.model_type=nosuch"], "student.config.model_type: transformers 5"),
        (["+student.config.hidden_act=nope"], "student.config: transformers cannot build a causal LM from it: unknown"),
        (["student.config.model_type=vit"], "cannot build a causal LM from it: Unrecognized configuration class"),
        (
            ["+deepspeed.extra.zero_optimization.bogus=1"],
            "deepspeed.extra: DeepSpeed refuses the student's config: DeepSpeedZeroConfig `bogus`: Extra inputs",
        ),
        (["+deepspeed.extra.zero_optimization.stage=7"], "DeepSpeedZeroConfig `stage`: Input should be 0, 1, 2, 3"),
        (["+deepspeed.extra.bf16.enabled=maybe"], "DeepSpeedBF16Config `enabled`: Input should be a valid boolean"),
        (
            ["+deepspeed.extra.gradient_accumulation_steps=3"],
            "the student's train_batch_size (8) is not train_micro_batch_size_per_gpu (4) x "
            "gradient_accumulation_steps (3) x world size (2) = 24",
        ),
        (["teacher.path=BAD_TEACHER"], "config.json: The hidden size (50) is not a multiple of the number of"),
    ],
)
def test_configs_the_libraries_refuse(tiny_assets, tmp_path, teacher_with_bad_sizes, extra, message):
    """What transformers or DeepSpeed refuse is found before any process starts: one line naming the
    key and the library's reason."""
    run_dir = tmp_path / "run"
    extra = [e.replace("BAD_TEACHER", str(teacher_with_bad_sizes)) for e in extra]
    result = cli(["train", *base_overrides(tiny_assets, run_dir), *extra])
    assert_clean_failure(result, message, run_dir)


def test_wandb_project_without_wandb_installed(tiny_assets, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: find_spec finds nothing
    run_dir = tmp_path / "run"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), "metrics.wandb_project=vkd"])
    assert_clean_failure(result, "`metrics.wandb_project` is set but wandb is not installed", run_dir)
