"""Kill -9 at random moments, and in the middle of writing a checkpoint: resume=auto continues
with exactly the loss curve of the run that was never killed (2 ranks, ZeRO-3)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, base_overrides, cpu_env, deepspeed_launch, free_port, train_job
from vkd_ds import checkpoint
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed

# About 17 s of start-up, then 200 short steps with a save every 5: kills land in all phases.
COMMON = ["trainer.max_steps=200", "trainer.save_every=5", "trainer.micro_batch_size=2", "trainer.eval_every=50"]


def steps_logged(run_dir) -> int:
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def kill_at_step(overrides, run_dir, step: int) -> bool:
    """Start the job in its own process group and kill -9 all of it as soon as metrics.csv shows
    `step` steps (mid-step, mid-save or mid-eval: wherever it is then); False if it ended first."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    job = subprocess.Popen(
        [*cmd, "launcher/train.py", *overrides],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while job.poll() is None:
        if steps_logged(run_dir) >= step:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            return True
        time.sleep(0.01)
    return False


def test_kill_9_at_random_moments_and_mid_checkpoint_then_resume_exactly(tiny_assets, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_job(base_overrides(tiny_assets, straight) + COMMON)
    overrides = base_overrides(tiny_assets, killed) + COMMON

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
    for column in ("loss", "loss/ce", "loss/soft", "eval/ppl"):
        assert [r[column] for r in rows_killed] == [r[column] for r in rows_straight], column
    assert (killed / "eval.json").read_text() == (straight / "eval.json").read_text()
    # Only complete checkpoints remain in the end (the partial one was replaced).
    for path in (killed / "checkpoints").iterdir():
        assert not path.name.startswith("step_") or (path / checkpoint.COMPLETE).is_file(), path
