"""The embedded default job, end to end: `vkd-ds demo --quick` on a fresh directory."""

import json

import pytest

from tests.conftest import vkd_cli

pytestmark = pytest.mark.distributed


def test_quick_demo_with_sequence_kd_end_to_end(tmp_path):
    """The demo with every term on: sequence KD is off in its config (docs/demo.md) and turned on here,
    at λ = 0.01: its gradient sums the log-probability over a sample's 32 tokens (docs/objective.md,
    Sequence KD), so 0.01 is about the push 0.3 gave when it averaged them (at 0.3 the distilled
    student lost: docs/demo.md).

    Which student wins is not asserted at this size: with packed rows (issue #29) both students see
    ~1.5x the documents per step and the quick demo's weak teacher (perplexity ~235) holds the
    distilled one back: 371.1 +- 21.5 against 354.7 +- 9.4 for CE only over seeds 1234, 1, 2 (one
    record per row: 414.6 +- 35.8 against 432.5 +- 11.3). docs/demo.md has the full
    demo's figures, where it wins."""
    out = tmp_path / "demo"
    result = vkd_cli(["demo", "--quick", "--out", str(out), "loss.seq=0.01"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    wins = summary["distilled_student_ppl"] < summary["ce_only_student_ppl"]
    verdict = "beats" if wins else "does NOT beat"
    assert f"the distilled student {verdict} the CE-only student" in result.stdout
    assert summary["distilled_student_ppl"] < summary["teacher_ppl"] * 2, summary  # it learned from the data
    for name in ("tokenizer", "teacher", "teacher_valence_head.safetensors", "train.jsonl", "valid.jsonl"):
        assert (out / "assets" / name).exists(), name
    for name in ("config.yaml", "metrics.csv", "train.log", "checkpoints"):
        assert (out / "run" / name).exists(), name
    # Every term is on, and the weights' effective sample size is reported.
    header = (out / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("loss/ce", "loss/soft", "loss/feat", "loss/seq", "loss/val", "loss/reg", "ess", "weight_max"):
        assert column in header, column
    assert 0 < summary["mean_ess"] <= 1 and "effective sample size" in result.stdout
    # Sequence KD raised the teacher's log-prob of the student's samples (measured: -9.68 -> -6.90).
    assert summary["seq_teacher_logprob_last"] > summary["seq_teacher_logprob_first"] + 1.0, summary
    # The demo ends with a report of the distillation run: one PNG per curve family.
    report = (out / "run" / "report" / "report.md").read_text()
    for png in ("loss.png", "weights.png", "seq_kd.png", "lr.png", "throughput.png", "eval.png"):
        assert (out / "run" / "report" / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report, png
    assert "report with plots" in result.stdout
    # The mercy gate is on by default: the demo is not ended by it, and the report says when it armed
    # (the full demo's 300 steps arm it; the quick demo's 80 may end before its batch error is low).
    armed = summary["gate_armed_at"]
    assert summary["gate_rejected"] < summary["steps"], summary
    said = f"The mercy gate armed at step {armed}:" if armed is not None else "The mercy gate never armed"
    assert said in report, report
    assert (out / "run" / "report" / "gate_valence.png").read_bytes()[:4] == b"\x89PNG"
    ce_header = (out / "run_ce_only" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss/seq" not in ce_header and "loss/soft" not in ce_header  # the baseline stays CE only

    # As the README's demo says: the distillation reruns on the demo's assets with `vkd-ds train`.
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
