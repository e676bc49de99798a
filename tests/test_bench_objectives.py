"""bench/objectives.py's own logic, without training: the sweep's grid and its widening, the validation
split, and the judge's measurements (bench/judge.py) on real tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import objectives  # noqa: E402
from judge import judge  # noqa: E402

from tests.conftest import save_tiny_model  # noqa: E402


def test_a_grid_widens_along_the_edge_its_best_point_lies_on_and_nowhere_else():
    grid = {"lr": [1e-3, 2e-3, 4e-3], "soft": [0.8, 4.0, 20.0]}
    assert len(objectives.points(grid)) == 9
    assert objectives.points({"seq": [0.1, 1.0]}) == [{"seq": 0.1}, {"seq": 1.0}]
    assert objectives.widened(grid, {"lr": 2e-3, "soft": 4.0}) == grid  # interior: done
    assert objectives.widened(grid, {"lr": 4e-3, "soft": 0.8}) == {
        "lr": [1e-3, 2e-3, 4e-3, 8e-3],
        "soft": [0.16, 0.8, 4.0, 20.0],
    }
    assert objectives.widened({"lr": [2e-3]}, {"lr": 2e-3}) == {"lr": [2e-3]}  # one value: not a sweep


def test_the_validation_split_is_carved_from_train_and_the_held_out_set_is_untouched(tiny_assets, tmp_path):
    split = objectives.split_assets(tiny_assets, tmp_path)
    train = (tiny_assets / "train.jsonl").read_text().splitlines()
    assert (split / "train.jsonl").read_text().splitlines() == train[: -objectives.TUNE_RECORDS]
    assert (split / "tune.jsonl").read_text().splitlines() == train[-objectives.TUNE_RECORDS :]
    assert (split / "test.jsonl").read_text() == (tiny_assets / "valid.jsonl").read_text()
    assert (split / "teacher").resolve() == (tiny_assets / "teacher").resolve()


@pytest.mark.parametrize("same", [True, False])
def test_the_judge_measures_no_divergence_from_the_teacher_itself_and_some_from_another_model(
    tiny_assets, tmp_path, same
):
    from transformers import AutoConfig

    teacher = tiny_assets / "teacher"
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    student = teacher if same else save_tiny_model(tmp_path / "student", vocab_size=vocab, seed=3)
    splits = {"test": tiny_assets / "valid.jsonl"}
    measured = judge(student, tiny_assets, splits, probes=4)
    kl, reverse_kl = measured["test/kl_teacher"], measured["test/sample_reverse_kl"]
    if same:
        assert abs(kl) < 1e-5 and abs(reverse_kl) < 1e-5
        assert measured["student_params"] == measured["teacher_params"]
    else:
        assert kl > 1e-3 and reverse_kl > 1e-3
        assert measured["student_params"] < measured["teacher_params"]
    assert 1 < measured["test/ppl"] < 10 * vocab and measured["test/sample_teacher_logprob"] < 0
