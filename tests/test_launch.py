"""Launching for real: two "nodes" with the deepspeed launcher's --no_ssh mode on this machine."""

import subprocess

import pytest

from tests.conftest import REPO, base_overrides, cpu_env, free_port, train_job
from vkd_ds.launch import launcher_command
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed


def test_two_nodes_without_ssh_train_like_one_two_process_launch(tiny_assets, tmp_path):
    """`deepspeed --no_ssh --node_rank R` on each "node" (one process each, master on 127.0.0.1):
    world size 2, and the same training as `deepspeed --num_gpus 2` on one node."""
    common = ["trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.eval_every=0"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    train_job(base_overrides(tiny_assets, single) + common)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            launcher_command(
                [*base_overrides(tiny_assets, multi), *common],
                None,
                launcher_args=[
                    "--hostfile",
                    str(hostfile),
                    "--no_ssh",
                    f"--node_rank={rank}",
                    "--master_addr=127.0.0.1",
                    f"--master_port={port}",
                ],
            ),
            cwd=REPO,
            env=cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    assert "vkd-ds: 2 rank(s)" in outputs[0][1]
    rows_single, rows_multi = read_metrics(single / "metrics.csv"), read_metrics(multi / "metrics.csv")
    assert [r["loss"] for r in rows_multi] == [r["loss"] for r in rows_single]
    assert (multi / "checkpoints" / "step_0000003" / "COMPLETE").is_file()


def test_runs_leave_no_shared_memory_behind(tiny_assets, tmp_path):
    """DeepSpeed's CPU accelerator creates a 66 MB /dev/shm buffer per rank and never removes it."""
    port = free_port()
    result = subprocess.run(
        launcher_command([*base_overrides(tiny_assets, tmp_path / "run"), "trainer.max_steps=1"], 2, master_port=port),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import glob

    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


def test_a_hydra_sweep_runs_each_job_through_the_launcher(tiny_assets, tmp_path):
    from tests.conftest import vkd_cli

    sweep = tmp_path / "sweep"
    overrides = base_overrides(tiny_assets, tmp_path / "unused") + [
        "-m",
        "weighting.lam=0,1",
        f"run.dir={sweep}/lam_${{weighting.lam}}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
    ]
    result = vkd_cli(["train", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    ess = {}
    for lam in ("0", "1"):
        run_dir = sweep / f"lam_{lam}"
        rows = read_metrics(run_dir / "metrics.csv")  # one directory per job, shared by its 2 ranks
        assert len(rows) == 2 and "vkd-ds: 2 rank(s)" in (run_dir / "train.log").read_text()
        assert f"lam: {lam}" in (run_dir / "config.yaml").read_text().replace(".0", "")
        ess[lam] = float(rows[0]["ess"])
    assert ess["0"] == 1.0 and ess["1"] < 1.0  # the sweep value reached each job
