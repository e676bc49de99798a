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
    head += ["training PFLOP", "wall s"] if pretraining else ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in report["results"].items():
        chosen = row["chosen"]
        setting = chosen.get("setting", "").replace(f"lr{chosen['lr']:g}", "").strip("_")
        cells = [f"`{arm}`", f"LR {chosen['lr']:g}" + (f", {setting}" if setting else "")]
        cells += [cell(row[key], digits) for key, _, digits in COLUMNS]
        if pretraining:
            cells.append(f"{row['train_flops'] / 1e15:.2f}")
        cells.append(f"{row['train_wall_s']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _marked(value: float, best: float) -> str:
    return f"**{value:.3f}**" if value == best else f"{value:.3f}"


def sweep_table(report: dict) -> list[str]:
    key = next(k for k in report if k.startswith("sweep_tune_"))
    sweep = report[key]
    settings = sorted({s for arm in sweep.values() for s in arm}, key=lambda s: (len(s), s))
    lines = ["| arm | " + " | ".join(settings) + " |", "|" + "---|" * (len(settings) + 1)]
    for arm, values in sweep.items():
        best = min(values.values())
        cells = [
            (f"**{values[s]:.3f}**" if values[s] == best else f"{values[s]:.3f}") if s in values else ""
            for s in settings
        ]
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    report = json.loads(Path(sys.argv[1]).read_text())
    print("\n".join(results_table(report)))
    print()
    print("\n".join(sweep_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
