"""The markdown tables of a bench/objectives.py results file, as bench/README.md shows them.

python bench/objectives_table.py bench/results_objectives_pretraining_quick.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("ppl", "test ppl", 2),
    ("kl_teacher", "KL(T‖S) on text", 3),
    ("sample_teacher_logprob", "samples' log p_T", 2),
    ("sample_reverse_kl", "KL(S‖T) on own samples", 3),
)


def cell(stats: dict, digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def results_table(report: dict) -> list[str]:
    pretraining = report["protocol"] == "pretraining"
    head = ["arm", "chosen", *(name for _, name, _ in COLUMNS)]
    head += ["training TFLOP", "wall s"] if pretraining else ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in report["results"].items():
        chosen = row["chosen"]
        setting = chosen.get("setting", "").replace(f"lr{chosen['lr']:g}", "").strip("_")
        edge = f" (edge: {', '.join(chosen['on_edge'])})" if chosen.get("on_edge") else ""
        cells = [f"`{arm}`", f"LR {chosen['lr']:g}" + (f", {setting}" if setting else "") + edge]
        cells += [cell(row[key], digits) for key, _, digits in COLUMNS]
        if pretraining:
            cells.append(f"{row['train_flops'] / 1e12:.2f}")
        cells.append(f"{row['train_wall_s']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _split(setting: str) -> tuple[str, str]:
    """("lr0.002", "soft4") from "lr0.002_soft4": a row of the sweep table and its column ("-": no λ)."""
    parts = setting.split("_")
    if parts[0].startswith("lr"):
        return parts[0], "_".join(parts[1:]) or "-"
    return "", setting


def _number(name: str) -> float:
    digits = name.lstrip("abcdefghijklmnopqrstuvwxyz")
    return float(digits) if digits and digits != "-" else 0.0


def sweep_table(report: dict) -> list[str]:
    """One row per arm (and LR), one column per swept λ; each arm's chosen point in bold."""
    key = next(k for k in report if k.startswith("sweep_tune_"))
    sweep = report[key]
    columns = sorted({_split(s)[1] for arm in sweep.values() for s in arm}, key=lambda c: (c != "-", _number(c)))
    lines = ["| arm | LR | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for arm, values in sweep.items():
        best = min(values.values())
        rows: dict[str, dict[str, float]] = {}
        for setting, value in values.items():
            row, column = _split(setting)
            rows.setdefault(row, {})[column] = value
        for row in sorted(rows, key=_number):
            cells = [_marked(rows[row][c], best) if c in rows[row] else "" for c in columns]
            lines.append(f"| `{arm}` | {row[2:] or report.get('lr', '')} | " + " | ".join(cells) + " |")
    return lines


def _marked(value: float, best: float) -> str:
    return f"**{value:.3f}**" if value == best else f"{value:.3f}"


def main() -> int:
    report = json.loads(Path(sys.argv[1]).read_text())
    print("\n".join(results_table(report)))
    print()
    print("\n".join(sweep_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
