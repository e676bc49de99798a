"""Where would the proxy gate arm, and would it then reject clean steps? (issue #17)

    vkd-ds train experiment=demo assets_dir=DIR/assets run.dir=R gate.ratio=0
    python bench/gate_arming.py R [R2 ...] [--ratio 0.9] [--warmup 20] [--arm 1e-3 5e-4 2e-4 1e-4 5e-5 2e-5]

A run with gate.ratio=0 logs the gate's projection (`gate/projected`) and its running batch valence
error (`gate/valence_mse`) on every step without ever rejecting, so the student trains as with the
gate off. For each candidate gate.arm_mse this prints, per run: the step the gate would arm at (the
first after --warmup steps whose running error is below it), the steps after that whose projection
falls below --ratio × the teacher's baseline (the clean steps it would reject), the longest streak
of them, the lowest projection after arming, the highest running error after arming and the step it
would disarm at (running error >= gate.DISARM_FACTOR × arm_mse; issue #30). Prints one JSON document.
The demo's own run (gate.ratio=0.9, nothing rejected) serves as well: `vkd-ds demo --out D`, then
`python bench/gate_arming.py D/run --arm 1e-4`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (puts the checkout's vkd_ds on the path)


def arming(rows: list[dict], arm_mse: float, ratio: float, warmup: int) -> dict:
    threshold = ratio * float(rows[0]["gate/baseline"])
    projected = [float(r["gate/projected"]) for r in rows]
    running = [float(r["gate/valence_mse"]) for r in rows]
    at = next((i + 1 for i in range(warmup, len(rows)) if running[i] < arm_mse), None)
    if at is None:
        return {"arm_mse": arm_mse, "armed_at": None}
    from vkd_ds.gate import DISARM_FACTOR

    below = [i + 1 for i in range(at - 1, len(rows)) if projected[i] < threshold]
    disarm = next((i + 1 for i in range(at - 1, len(rows)) if running[i] >= DISARM_FACTOR * arm_mse), None)
    streak = longest = 0
    for i in range(at - 1, len(rows)):
        streak = streak + 1 if projected[i] < threshold else 0
        longest = max(longest, streak)
    return {
        "arm_mse": arm_mse,
        "armed_at": at,
        "would_reject": len(below),
        "longest_streak": longest,
        "lowest_projection": min(projected[at - 1 :]),
        "threshold": threshold,
        "highest_error_after_arming": max(running[at - 1 :]),
        "would_disarm_at": disarm,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories trained with gate.ratio=0")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--arm", type=float, nargs="+", default=[1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5])
    args = parser.parse_args()
    from vkd_ds.metrics import read_metrics

    report = {}
    for run in args.runs:
        rows = read_metrics(Path(run) / "metrics.csv")
        running = [float(r["gate/valence_mse"]) for r in rows]
        report[run] = {
            "steps": len(rows),
            "running_error_at": {s: running[s - 1] for s in (1, 10, 20, 30, 50, 100, 150, 200) if s <= len(rows)},
            "candidates": [arming(rows, arm, args.ratio, args.warmup) for arm in args.arm],
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
