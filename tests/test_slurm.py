"""A real SLURM: a one-node cluster (slurmctld + slurmd, munge auth) started on this machine,
`sbatch slurm/train.sbatch` with 2 tasks, and a preempted job that checkpoints, requeues and resumes.

Needs Debian's slurm-wlm and root (`.ci/run` installs it); skipped with the reason otherwise."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, base_overrides, cpu_env, free_port
from vkd_ds import checkpoint
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed

SLURM_CONF = """\
ClusterName=vkdtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _why_no_slurm() -> str | None:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged") if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}; apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd for a one-node test cluster needs root"
    return None


def _ensure_munged() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    subprocess.run(["munged", "--force"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a running one-node cluster."""
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    _ensure_munged()
    base = tmp_path_factory.mktemp("slurm")
    (base / "state").mkdir()
    (base / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), dir=base, cpus=os.cpu_count())
    )
    env = {**cpu_env(), "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for daemon in ("slurmctld", "slurmd")
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if out.strip() == "idle":
                break
            time.sleep(1)
        else:
            pytest.fail(f"the test cluster did not come up: {(base / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)


def job_state(env, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def submit(env, assets, run_dir, steps=30) -> str:
    overrides = base_overrides(assets, run_dir) + [
        f"trainer.max_steps={steps}",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=0",
        "trainer.save_every=10",
    ]
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
        + ["--time=20", f"--output={run_dir.parent / 'slurm-%j.out'}", "slurm/train.sbatch", *overrides],
        cwd=REPO,
        env={**env, "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def finished(env, job):
    state = job_state(env, job).get("JobState")
    assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job_state(env, job)
    return state == "COMPLETED"


@pytest.fixture(scope="module")
def straight_job(slurm, tiny_assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm_straight") / "run"
    job = submit(slurm, tiny_assets, run_dir)
    wait_for(lambda: finished(slurm, job), 300, f"job {job} to complete")
    return run_dir


def test_sbatch_trains_on_two_tasks_and_checkpoints(straight_job):
    rows = read_metrics(straight_job / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [p.name for p in checkpoint.complete_checkpoints(straight_job)] == ["step_0000020", "step_0000030"]
    log = (straight_job / "train.log").read_text()
    assert "vkd-ds: 2 rank(s)" in log and (straight_job / "eval.json").is_file()


def test_a_signalled_job_checkpoints_requeues_and_resumes_exactly(slurm, straight_job, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, tiny_assets, run_dir)
    wait_for(
        lambda: (run_dir / "metrics.csv").is_file() and len(read_metrics(run_dir / "metrics.csv")) >= 5, 300, "5 steps"
    )
    # What SLURM sends ahead of the time limit (--signal=USR1@120 in the script): one of the default
    # trainer.preempt_signals; the default trainer.requeue=auto requeues the job after its checkpoint.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    log = run_dir / "train.log"
    wait_for(lambda: log.is_file() and "requeueing SLURM job" in log.read_text(), 120, "the requeue")
    # A requeued job waits about 2 minutes before it may start again; let it start now. Not within the
    # second of the requeue: slurmd revoked the first run's credential then, and (timestamps in whole
    # seconds) refuses a new one from that second too ("Job credential revoked": the job FAILS).
    wait_for(lambda: job_state(slurm, job).get("JobState") == "PENDING", 120, "the job back in the queue")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait_for(lambda: finished(slurm, job), 300, f"job {job} to complete after its requeue")
    text = log.read_text()
    assert "preempted (SIGUSR1) at step" in text and "resumed from" in text
    assert job_state(slurm, job)["Restarts"] == "1"
    rows = read_metrics(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))  # each step once
    # The same loss curve as the job that was never interrupted.
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(straight_job / "metrics.csv")]
