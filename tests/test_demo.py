"""The embedded default job, end to end: `vkd-ds demo --quick` on a fresh directory."""

import json

import pytest

from tests.conftest import vkd_cli

pytestmark = pytest.mark.distributed


def test_quick_demo_distilled_student_beats_ce_only(tmp_path):
    out = tmp_path / "demo"
    result = vkd_cli(["demo", "--quick", "--out", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distilled_student_ppl"] < summary["ce_only_student_ppl"], summary
    assert "the distilled student beats the CE-only student" in result.stdout
    for name in ("tokenizer", "teacher", "teacher_valence_head.safetensors", "train.jsonl", "valid.jsonl"):
        assert (out / "assets" / name).exists(), name
    for name in ("config.yaml", "metrics.csv", "train.log", "checkpoints"):
        assert (out / "run" / name).exists(), name
    # Every term but sequence KD is on, and the weights' effective sample size is reported.
    header = (out / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("loss/ce", "loss/soft", "loss/feat", "loss/val", "loss/reg", "ess", "weight_max"):
        assert column in header, column
    assert 0 < summary["mean_ess"] <= 1 and "effective sample size" in result.stdout

    # SPEC §7: the distillation reruns on the demo's assets with `vkd-ds train`.
    rerun = out / "rerun"
    result = vkd_cli(
        [
            "train",
            "experiment=demo",
            f"assets_dir={out / 'assets'}",
            f"run.dir={rerun}",
            "trainer.max_steps=2",
            "trainer.eval_max_batches=1",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((rerun / "metrics.csv").read_text().splitlines()) == 3  # header + 2 steps
