"""The run's progress as it trains: a bar on rank 0 (trainer.progress_bar) and a log line every
trainer.log_every steps, and at every eval."""

from __future__ import annotations

import sys

from vkd_ds import dist
from vkd_ds.metrics import get_logger
from vkd_ds.settings import TrainerSettings


class Progress:
    def __init__(self, settings: TrainerSettings, step: int):
        """`step`: the step the run starts from (a resume's)."""
        self.settings = settings
        self.log = get_logger()
        self.bar = None
        wanted = settings.progress_bar
        if dist.is_main() and wanted is not False and (wanted != "auto" or sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=settings.max_steps, initial=step, desc="distill", dynamic_ncols=True)

    def report(self, metrics: dict[str, float]) -> None:
        bar = self.bar
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if metrics["step"] % self.settings.log_every == 0 or "eval/ce" in metrics:
            shown = {k: v for k, v in metrics.items() if k.startswith(("loss", "eval/")) or k in ("lr", "tokens_per_s")}
            self.log.info(
                "step %d/%d %s",
                metrics["step"],
                self.settings.max_steps,
                " ".join(f"{k}={_short(v)}" for k, v in shown.items()),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
