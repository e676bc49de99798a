"""Kill -9 at random moments, and in the middle of writing a checkpoint: resume=auto continues
with exactly the loss curve of the run that was never killed (2 ranks, ZeRO-3), on a corpus
prepared with `vkd-ds prepare-data`."""

import random

import pytest

from tests.conftest import (
    FULL_OBJECTIVE,
    base_overrides,
    deepspeed_launch,
    kill_at_step,
    save_tiny_model,
    steps_logged,
    train_job,
    vkd_cli,
)
from vkd_ds import checkpoint
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed

# About 17 s of start-up, then 200 short steps with a save every 5: kills land in all phases; a
# quarter of the steps on the student's own samples (on-policy), which resume must choose alike.
COMMON = ["trainer.max_steps=200", "trainer.save_every=5", "trainer.micro_batch_size=2", "trainer.eval_every=50"]
COMMON += ["onpolicy.fraction=0.25", "seq_kd.n_gen=8"]


def prepared_stores(overrides: list[str], store_dir) -> list[str]:
    """`vkd-ds prepare-data` of the run's data; overrides that name the prepared stores instead."""
    result = vkd_cli(["prepare-data", *overrides, f"data.store_dir={store_dir}"])
    assert result.returncode == 0, result.stderr
    stores = dict(line.split(" token store ") for line in result.stdout.splitlines() if " token store " in line)
    assert len(stores) == 2, result.stdout  # train and valid
    (train,) = [v for k, v in stores.items() if k.startswith("train:")]
    (valid,) = [v for k, v in stores.items() if k.startswith("valid:")]
    return [f"data.train_path={train}", f"data.valid_path={valid}"]


def test_kill_9_at_random_moments_and_mid_checkpoint_then_resume_exactly(tiny_assets, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_job(base_overrides(tiny_assets, straight) + COMMON)
    # The killed run reads stores prepared beforehand (the straight one its JSONL, through the store
    # that training prepares itself): the same rows, and the same curve.
    overrides = base_overrides(tiny_assets, killed) + COMMON
    overrides += prepared_stores(base_overrides(tiny_assets, killed), tmp_path / "prepared")

    # Rank 1 dies (SIGKILL) with step 10's shards on disk, before the checkpoint is published.
    result = deepspeed_launch(["launcher/train.py", *overrides], 2, env={"VKD_FAULT_KILL_IN_SAVE": "10:1"})
    assert result.returncode != 0
    partial = killed / "checkpoints" / "step_0000010"
    assert partial.is_dir() and not (partial / checkpoint.COMPLETE).exists()
    assert checkpoint.latest_checkpoint(killed).name == "step_0000005"

    # Then kill -9 the whole job at random moments of training (steps, saves, an eval).
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        kills += kill_at_step(overrides, killed, min(199, steps_logged(killed) + rng.randint(3, 40)))
    assert kills == 5
    resumed = train_job(overrides)  # finishes whatever is left
    assert "resumed from" in resumed.stderr or "run already complete" in resumed.stderr

    rows_killed, rows_straight = read_metrics(killed / "metrics.csv"), read_metrics(straight / "metrics.csv")
    assert [r["step"] for r in rows_killed] == [str(s) for s in range(1, 201)]  # each step once
    for column in ("loss", "loss/ce", "loss/soft", "onpolicy", "eval/ppl"):
        assert [r[column] for r in rows_killed] == [r[column] for r in rows_straight], column
    assert 20 < sum(r["onpolicy"] == "1" for r in rows_straight) < 80
    assert (killed / "eval.json").read_text() == (straight / "eval.json").read_text()
    # Only complete checkpoints remain in the end (the partial one was replaced).
    for path in (killed / "checkpoints").iterdir():
        assert not path.name.startswith("step_") or (path / checkpoint.COMPLETE).is_file(), path


def _curve(run_dir, column="loss"):
    return [float(r[column]) for r in read_metrics(run_dir / "metrics.csv") if r.get(column)]


def test_elastic_resume_two_ranks_to_one_and_one_to_two(tiny_assets, tmp_path):
    """A ZeRO-3 checkpoint of 2 ranks resumes on 1 rank, one of 1 rank on 2, and a ZeRO-2 one of 2 ranks
    on 1 (through DeepSpeed's universal checkpoint), with the global batch kept: the curve goes on as
    if nothing changed (the straight run is ZeRO-3; the stages agree to rounding)."""
    student = save_tiny_model(tmp_path / "student")
    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=3", "trainer.grad_accum=2"]
    common += [f"student.path={student}", *FULL_OBJECTIVE]
    layout = {2: ["trainer.micro_batch_size=2"], 1: ["trainer.micro_batch_size=4"]}  # 8 sequences a step
    straight = tmp_path / "straight"
    train_job(base_overrides(tiny_assets, straight) + common + layout[2])
    for first, then, stage in ((2, 1, "zero3"), (1, 2, "zero3"), (2, 1, "zero2")):
        run_dir = tmp_path / f"{stage}_from{first}to{then}"
        overrides = base_overrides(tiny_assets, run_dir) + common + [f"deepspeed={stage}"]
        train_job(overrides + layout[first] + ["trainer.stop_after_steps=3"], num_procs=first)
        # A different global batch would silently change what a step means: refused, nothing written.
        refused = deepspeed_launch(["launcher/train.py", *overrides, "trainer.micro_batch_size=1"], then)
        assert refused.returncode != 0
        assert "global batch of 8 sequences, this run has" in refused.stderr and "Traceback" not in refused.stderr
        assert len(_curve(run_dir)) == 3
        resumed = train_job(overrides + layout[then], num_procs=then)
        assert "resumed from" in resumed.stderr
        assert (run_dir / "checkpoints" / "step_0000003" / checkpoint.UNIVERSAL).is_dir()
        for column in ("loss", "loss/ce", "loss/soft", "loss/feat", "loss/seq", "loss/val", "eval/ce"):
            ours, reference = _curve(run_dir, column), _curve(straight, column)
            assert len(ours) == len(reference) and ours[0] != ours[-1]  # and it kept training
            for a, b in zip(ours, reference, strict=True):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (column, ours, reference)
