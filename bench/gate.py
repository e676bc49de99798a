"""Step-time cost of the mercy gate (issues #5, #17): the same run with the gate off, in proxy mode
and in lookahead mode over a grid of `gate.probe_size` × `gate.rollout_steps`, each armed from the
first step (no warm-up) with gate.ratio=0, so that every step is decided, none is rejected and the
runs train alike.

    python bench/gate.py [--steps 40] [--skip 5] [--procs 2] [--out DIR]
                         [--probes 4 8 16] [--rollout 8 16 32] [overrides ...]

Builds small assets (tests' tiny teacher and data) in DIR, then runs `launcher/train.py` with the
deepspeed launcher (`--procs` processes, DeepSpeed's CPU accelerator without a GPU) on the default
2 × 128 student; the step time is the median of metrics.csv's `step_time_s` after the first
`--skip` steps (the first steps compute the teacher's baseline and warm up). With
trainer.time_phases=true the gate's own seconds (`time/gate`: the proxy's valence sums and its
all-reduce, lookahead's snapshot, rollouts and scoring) are measured inside each step, a figure that
does not drift with the machine the way two runs' step times do. Extra hydra overrides apply to every
run. Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_env, describe, run_parser, train, work_dir  # noqa: E402

ARMED = ["gate.enabled=true", "gate.ratio=0", "gate.warmup_steps=0", "gate.arm_mse=1e9"]


def timed(rows: list[dict], skip: int) -> dict:
    steps = [float(r["step_time_s"]) for r in rows[skip:]]
    gate = [float(r.get("time/gate") or 0.0) for r in rows[skip:]]
    return {
        "median_step_s": round(statistics.median(steps), 4),
        "gate_share": round(sum(gate) / sum(steps), 4),  # the gate's seconds over the steps' seconds
        "steps_timed": len(steps),
    }


def main() -> int:
    parser = run_parser(__doc__, steps=40, skip=5)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16], help="lookahead's gate.probe_size")
    parser.add_argument("--rollout", type=int, nargs="+", default=[8, 16, 32], help="lookahead's gate.rollout_steps")
    args = parser.parse_args()
    out = work_dir(args.out, "gate")
    env = bench_env(args.procs)
    assets = out / "assets"
    if not (assets / "teacher").is_dir():
        from vkd_ds.assets import write_tiny_assets

        write_tiny_assets(assets)
    common = asset_overrides(assets, 128) + [f"trainer.max_steps={args.steps}", "loss.seq=0", *args.overrides]
    common.append("trainer.time_phases=true")
    report: dict = {**describe(env, args.procs), "steps": args.steps, "overrides": args.overrides}
    report["off"] = timed(train(args.procs, common + ["gate.enabled=false"], out / "off", env), args.skip)
    report["proxy"] = timed(train(args.procs, common + ARMED + ["gate.mode=proxy"], out / "proxy", env), args.skip)
    base = report["off"]["median_step_s"]
    report["proxy"]["overhead"] = round(report["proxy"]["median_step_s"] / base - 1, 4)
    report["lookahead"] = []
    for probes in args.probes:
        for tokens in args.rollout:
            overrides = ARMED + ["gate.mode=lookahead", f"gate.probe_size={probes}", f"gate.rollout_steps={tokens}"]
            rows = train(args.procs, common + overrides, out / f"lookahead_p{probes}_r{tokens}", env)
            result = {"probe_size": probes, "rollout_steps": tokens, **timed(rows, args.skip)}
            result["overhead"] = round(result["median_step_s"] / base - 1, 4)
            report["lookahead"].append(result)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
