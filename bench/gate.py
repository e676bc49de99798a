"""Step-time cost of the mercy gate (issue #5): the same run with the gate off, in proxy mode and in
lookahead mode, each with gate.ratio=0 so that every step is kept and the runs train alike.

    python bench/gate.py [--steps 40] [--skip 5] [--procs 2] [--out DIR] [overrides ...]

Builds small assets (tests' tiny teacher and data) in DIR, then runs `launcher/train.py` with the
deepspeed launcher (`--procs` processes, DeepSpeed's CPU accelerator without a GPU) on the default
2 × 128 student; the step time is the median of metrics.csv's `step_time_s` after the first
`--skip` steps (the first steps compute the teacher's baseline and warm up). Extra hydra overrides
apply to all three runs. Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_env, describe, median_of, run_parser, train, work_dir  # noqa: E402

MODES = {
    "off": ["gate.enabled=false"],
    "proxy": ["gate.enabled=true", "gate.mode=proxy", "gate.ratio=0"],
    "lookahead": ["gate.enabled=true", "gate.mode=lookahead", "gate.ratio=0"],
}


def main() -> int:
    parser = run_parser(__doc__, steps=40, skip=5)
    args = parser.parse_args()
    out = work_dir(args.out, "gate")
    env = bench_env(args.procs)
    assets = out / "assets"
    if not (assets / "teacher").is_dir():
        from vkd_ds.assets import write_tiny_assets

        write_tiny_assets(assets)
    common = asset_overrides(assets, 128) + [f"trainer.max_steps={args.steps}", "loss.seq=0", *args.overrides]
    report: dict = {**describe(env, args.procs), "steps": args.steps, "overrides": args.overrides}
    for mode, overrides in MODES.items():
        rows = train(args.procs, common + overrides, out / mode, env)
        steps_timed = len(rows) - args.skip
        report[mode] = {
            "median_step_s": round(median_of(rows, "step_time_s", args.skip), 4),
            "steps_timed": steps_timed,
        }
    base = report["off"]["median_step_s"]
    for mode in ("proxy", "lookahead"):
        report[mode]["overhead"] = round(report[mode]["median_step_s"] / base - 1, 4)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
