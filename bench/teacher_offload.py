"""The price of teacher offload (issue #7): the same run with the teacher's ZeRO-3 shards offloaded
to CPU between uses (`teacher.offload_param=cpu`, the default) and kept on the device (`none`).

    python bench/teacher_offload.py [--steps 20] [--skip 4] [--procs 2] [--out DIR] [overrides ...]

The issue's shapes (4 × 256 Llama teacher, 2 × 128 student, vocabulary 8192, 256 tokens, global
batch 8 with a --procs that divides 8), CE + soft KD, ZeRO-3, `trainer.time_phases=true`.
Reports the median step time, the mean
teacher-forward time, and peak memory: each process's peak RSS, and on GPUs the peak allocated
device memory. Without a GPU DeepSpeed's CPU accelerator keeps "device" memory in host RAM as well,
so there the figure is only the cost of the extra copies. Prints one JSON document. State the
allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_assets, bench_env, describe, median_of, run_parser, train, work_dir  # noqa: E402

from vkd_ds.terms import only_terms  # noqa: E402

OBJECTIVE = [*only_terms("ce", "soft"), "weighting.lam=0", "trainer.time_phases=true"]


def main() -> int:
    parser = run_parser(__doc__, steps=20, skip=4)
    args = parser.parse_args()
    out = work_dir(args.out, "offload")
    env = bench_env(args.procs)
    assets = bench_assets(out, 8192, 256)
    common = asset_overrides(assets, 256) + OBJECTIVE
    common += [f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={8 // args.procs}", *args.overrides]
    report: dict = {**describe(env, args.procs), "steps": args.steps, "overrides": args.overrides}
    for offload in ("none", "cpu"):
        rows = train(args.procs, common + [f"teacher.offload_param={offload}"], out / offload, env)
        result = {
            "median_step_s": round(median_of(rows, "step_time_s", args.skip), 4),
            "teacher_forward_s": round(
                statistics.fmean(float(r["time/teacher_forward"]) for r in rows[args.skip :]), 4
            ),
            "peak_rss_gb": round(max(float(r["mem_peak_rss_gb"]) for r in rows), 4),
        }
        if rows[-1].get("mem_gpu_gb"):
            result["peak_gpu_gb"] = round(max(float(r["mem_gpu_gb"]) for r in rows), 4)
        report[f"offload_{offload}"] = result
    report["step_time_ratio"] = round(
        report["offload_cpu"]["median_step_s"] / report["offload_none"]["median_step_s"], 4
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
