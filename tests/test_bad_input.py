"""Bad input: one clear message naming the problem and where, exit status 2, no traceback,
and no run directory written."""

import json

import pytest

from tests.conftest import base_overrides, deepspeed_launch, vkd_cli


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


def test_missing_teacher_path(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={tmp_path / 'no_teacher'}"])
    assert_clean_failure(result, f"teacher.path: directory not found: {tmp_path / 'no_teacher'}", run_dir)


def test_malformed_jsonl_line(tiny_assets, tmp_path, malformed_data):
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), f"data.train_path={malformed_data}"])
    assert_clean_failure(result, f"{malformed_data}:3: malformed JSON", run_dir)


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
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), f"teacher.path={small}"])
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
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), f"student.path={student}"])
    assert_clean_failure(result, "vocabulary mismatch: the student at", run_dir)


def test_global_batch_inconsistent_with_world_size(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = vkd_cli(
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


def test_unknown_key(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), "trainer.max_stpes=3"])
    assert_clean_failure(result, "bad config override", run_dir)


def test_export_of_a_directory_without_checkpoints(tmp_path):
    result = vkd_cli(["export", str(tmp_path), str(tmp_path / "out")])
    assert_clean_failure(result, "holds no complete checkpoint", tmp_path / "out")


def test_cfg_job_prints_the_resolved_config(tiny_assets, tmp_path):
    result = vkd_cli(["train", "--cfg", "job", *base_overrides(tiny_assets, tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert f"path: {tiny_assets / 'teacher'}" in result.stdout and "temperature: 4.0" in result.stdout
    assert not (tmp_path / "run").exists()


def test_non_utf8_or_binary_data_is_reported(tiny_assets, tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n\xff\xfe\x00garbage\n")
    run_dir = tmp_path / "run"
    result = vkd_cli(["train", *base_overrides(tiny_assets, run_dir), f"data.train_path={path}"])
    assert_clean_failure(result, f"{path}:2: ", run_dir)
