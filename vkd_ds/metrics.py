"""Run-directory outputs of rank 0: `train.log` and `metrics.csv` (one row per optimizer step)."""

from __future__ import annotations

import csv
import logging
import os
import sys
import uuid
from pathlib import Path

LOGGER_NAME = "vkd_ds"


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Rank 0 logs INFO to stderr and run_dir/train.log; other ranks log warnings only."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and run_dir is not None:
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    # DeepSpeed's INFO lines drown the run's own log; keep its warnings.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class MetricsCSV:
    """Appends one row per step. On resume, rows after the resumed step are dropped first,
    so the file always holds exactly one row per completed step."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.columns: list[str] | None = None
        self.steps: set[int] = set()
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or []) or None
                rows = [row for row in reader if int(row["step"]) <= resume_step]
            self.steps = {int(row["step"]) for row in rows}
            self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            if self.columns:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
            self._rewrite([])
        elif any(key not in self.columns for key in row):
            with self.path.open(newline="", encoding="utf-8") as handle:
                old = list(csv.DictReader(handle))
            self.columns += [key for key in row if key not in self.columns]
            self._rewrite(old)
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self.steps.add(int(row["step"]))


class MetricsSinks:
    """Rank 0's metric outputs: metrics.csv always; TensorBoard event files in run_dir/tensorboard
    (`metrics.tensorboard`); Weights & Biases when `metrics.wandb_project` is set."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb_project: str | None, config: dict):
        self.csv = MetricsCSV(run_dir / "metrics.csv", resume_step)
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint it resumes from.
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        self.wandb = None
        if wandb_project:
            import wandb

            # One W&B run per run.dir: a resumed job logs into the run its first invocation started
            # (resume="allow"). Steps a killed job logged after its checkpoint are logged again with
            # the same values (resume is exact); W&B keeps the first and ignores the repeat.
            self.wandb = wandb.init(
                project=wandb_project, dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow", config=config
            )

    def has_step(self, step: int) -> bool:
        return step in self.csv.steps

    def write(self, row: dict) -> None:
        self.csv.write(row)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: made on first use (12 hex digits) and kept in run_dir/wandb_id."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        tmp.replace(id_file)  # atomic: a kill leaves no empty id behind
    return id_file.read_text().strip()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
