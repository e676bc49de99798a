"""`vkd-ds report RUN_DIR`: a Markdown report with PNG plots of a run's metrics.csv.

Each plot shows one family of columns against the step; a family whose columns the run did not
log (sequence KD off, gate off, ...) is left out and the report says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.metrics import read_metrics

# (file name, title, y label, columns or a column prefix, log scale)
PLOTS = [
    ("loss.png", "Loss and its terms (weighted means over the global batch)", "loss", ("loss", "loss/"), True),
    ("weights.png", "Valence weights: effective sample size and largest weight", "", ("ess", "weight_max"), False),
    ("saliency.png", "Teacher saliency over the global batch", "", ("saliency_mean", "saliency_std"), False),
    (
        "seq_kd.png",
        "Sequence KD: teacher log-prob of the student's samples",
        "nats / token",
        ("seq/teacher_logprob",),
        False,
    ),
    (
        "gate.png",
        "Mercy gate: rejected steps and non-finite skips (running counts)",
        "steps",
        ("gate/rejected", "gate/nonfinite"),
        False,
    ),
    (
        "gate_valence.png",
        "Mercy gate: projected valence against the threshold (ratio x the teacher's baseline)",
        "valence",
        ("gate/projected", "gate/threshold"),
        False,
    ),
    ("lr.png", "Learning rate", "lr", ("lr",), False),
    ("throughput.png", "Throughput", "tokens / s", ("tokens_per_s",), False),
    ("phases.png", "Seconds per step by phase (trainer.time_phases)", "s", ("time/",), False),
    ("eval.png", "Held-out perplexity (student and teacher)", "perplexity", ("eval/ppl", "eval/teacher_ppl"), True),
]


def _columns(header: list[str], spec: tuple[str, ...]) -> list[str]:
    out = []
    for name in spec:
        if name.endswith("/"):
            out += [c for c in header if c.startswith(name)]
        elif name in header:
            out.append(name)
    return out


def _series(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(column, "")
        if value not in ("", None):
            number = float(value)
            if math.isfinite(number):
                steps.append(int(row["step"]))
                values.append(number)
    return steps, values


def armed_step(rows: list[dict]) -> int | None:
    """The first step the mercy gate decided (`gate/armed`), None if it never armed."""
    return next((int(row["step"]) for row in rows if row.get("gate/armed") == "1"), None)


def _gate_arming(rows: list[dict]) -> str:
    step = armed_step(rows)
    if step is not None:
        return f"The mercy gate armed at step {step}: every earlier step committed."
    last = rows[-1].get("gate/valence_mse", "")
    mse = f" (running batch valence MSE at the end: {float(last):.4g}, gate.arm_mse in config.yaml)" if last else ""
    return f"The mercy gate never armed{mse}: every step committed unless it was non-finite."


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Writes OUT_DIR/report.md (default RUN_DIR/report) and one PNG per plotted family."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise VkdError(f"report: {run_dir} has no metrics.csv (not a vkd-ds run directory)")
    rows = read_metrics(metrics)
    if not rows:
        raise VkdError(f"report: {metrics} holds no steps yet")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header = list(rows[0].keys())
    lines = [f"# vkd-ds run report: {run_dir.resolve()}", "", f"{len(rows)} optimizer steps in metrics.csv.", ""]
    summary = run_dir / "eval.json"
    if summary.is_file():
        lines += ["## Final held-out evaluation", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in json.loads(summary.read_text()).items()
        ]
        lines.append("")
    skipped = []
    for filename, title, ylabel, spec, log_scale in PLOTS:
        columns = [c for c in _columns(header, spec) if _series(rows, c)[0]]
        if not columns:
            skipped.append(title)
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for column in columns:
            steps, values = _series(rows, column)
            ax.plot(steps, values, label=column, marker="." if len(steps) < 30 else None)
        if log_scale and all(v > 0 for c in columns for v in _series(rows, c)[1]):
            ax.set_yscale("log")
        notes = []
        if filename == "gate_valence.png":
            step = armed_step(rows)
            if step is not None:
                ax.axvline(step, color="black", linestyle="--", linewidth=1, label=f"armed (step {step})")
            notes = [_gate_arming(rows), ""]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{filename}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out / filename)
        lines += [
            f"## {title}",
            "",
            f"![{title}]({filename})",
            "",
            f"Columns: {', '.join(f'`{c}`' for c in columns)}.",
            "",
            *notes,
        ]
    if skipped:
        lines += ["## Not logged by this run", ""] + [f"- {title}" for title in skipped] + [""]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, report)
    return report
