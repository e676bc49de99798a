"""Preemption: the signals that end a run at the end of its step, and SLURM's requeue."""

from __future__ import annotations

import os
import signal


class Preemption:
    """Records the first of `names` (e.g. SIGUSR1, SIGTERM) this process receives; the loop checkpoints
    and stops at the end of the step. SLURM sends SIGUSR1 ahead of the time limit with
    `--signal=USR1@SECONDS`, and SIGTERM when it preempts or cancels a job."""

    def __init__(self, names):
        self.received: str | None = None
        self._previous = {}
        for name in names:
            number = getattr(signal, str(name))
            self._previous[number] = signal.signal(number, self._handler)

    def _handler(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def requeue(mode: str, log) -> None:
    """Under SLURM (`trainer.requeue=auto`), put the job back in the queue: the requeued job runs the
    batch script again and resume=auto continues from the checkpoint just written."""
    job = os.environ.get("SLURM_JOB_ID")
    if mode == "never" or job is None:
        log.info("resume=auto continues from this checkpoint")
        return
    import subprocess

    # Logged first: the requeue cancels this job's own tasks, possibly before scontrol returns here.
    log.info("requeueing SLURM job %s; it resumes from this checkpoint", job)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); resubmit to resume", job, result.stderr.strip())
