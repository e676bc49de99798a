"""The cost of each part of a vkd-ds step, measured in one run (issue #7): teacher forward,
student forward, loss, backward, optimizer, rollouts (sequence KD), the valence weights and the
gate's snapshots (none here: at gate.ratio=0 it keeps every step, and its decision counts in
`time/other`), and the orchestration left over (`time/other`: batching, the metric reductions, Python
between phases; target at most 10% of the step).

    python bench/step_cost.py [--steps 30] [--skip 5] [--procs 2] [--out DIR] [overrides ...]

Every term and the gate (proxy mode, gate.ratio=0 so every step is kept) on the issue's shapes:
a 4 × 256 Llama teacher, the default 2 × 128 student, vocabulary 8192, 256-token sequences,
global batch 8 (micro-batch 8 / --procs on each rank; use a --procs that divides 8), ZeRO-3,
fp32, `trainer.time_phases=true`.
Reports each phase's mean seconds per step over the steps after `--skip` and its share of the step.
Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_assets, bench_env, describe, run_parser, train, work_dir  # noqa: E402

from vkd_ds.terms import loss_overrides  # noqa: E402

EVERY_TERM = [
    *loss_overrides(ce=1.0, soft=0.8, feat=0.4, seq=0.3, val=0.6, reg=0.01),
    "gate.enabled=true",
    "gate.mode=proxy",
    "gate.ratio=0",
]


def main() -> int:
    parser = run_parser(__doc__, steps=30, skip=5)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    out = work_dir(args.out, "step")
    env = bench_env(args.procs)
    assets = bench_assets(out, args.vocab, args.seq_len)
    overrides = asset_overrides(assets, args.seq_len) + EVERY_TERM
    overrides += [f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={8 // args.procs}"]
    overrides += ["trainer.time_phases=true", *args.overrides]
    rows = train(args.procs, overrides, out / "run", env)[args.skip :]
    step = statistics.fmean(float(r["step_time_s"]) for r in rows)
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and r[k] != ""})
    seconds = {k[len("time/") :]: statistics.fmean(float(r[k] or 0.0) for r in rows) for k in phases}
    report = {
        **describe(env, args.procs),
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "steps_timed": len(rows),
        "overrides": args.overrides,
        "step_s": round(step, 4),
        "tokens_per_s": round(statistics.fmean(float(r["tokens_per_s"]) for r in rows), 1),
        "phase_s": {name: round(value, 4) for name, value in seconds.items()},
        "phase_share": {name: round(value / step, 4) for name, value in seconds.items()},
        "orchestration_share": round(seconds["other"] / step, 4),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
