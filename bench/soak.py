"""Soak run (issue #7): 300+ steps of the demo with every term and the mercy gate on; resident
memory per step (metrics.csv `mem_rss_gb`, the largest rank's) must not grow after warm-up.

    python bench/soak.py [--steps 320] [--warmup 50] [--out DIR] [overrides ...]

The demo's assets (built in DIR/assets as `vkd-ds demo` builds them, or reused), 2 processes,
ZeRO-3, every term at the demo's weights plus sequence KD at 0.3, the gate in
proxy mode at gate.ratio=0 (it decides every step and keeps them) and a non-finite loss injected on
rank 1 every 30th step (VKD_FAULT_NAN_LOSS), so the snapshot/revert path runs 10 times too;
checkpoints and evals every 100 steps. Reports RSS after warm-up, its largest rise above that,
and the least-squares slope over the steps after warm-up. Prints one JSON document.
State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env, describe, train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from vkd_ds.demo import FULL, build_assets, fit_demo_valence_head

    out = Path(args.out or tempfile.mkdtemp(prefix="vkd-bench-soak-")).resolve()
    assets = out / "assets"
    with contextlib.redirect_stdout(sys.stderr):  # the demo's progress lines; stdout is the JSON
        build_assets(assets, FULL)
        if not (assets / "teacher_valence_head.safetensors").is_file():
            fit_demo_valence_head(assets, FULL)
    env = bench_env(2)
    faults = list(range(30, args.steps + 1, 30))
    env["VKD_FAULT_NAN_LOSS"] = ",".join(f"{step}:1" for step in faults)
    overrides = [
        "experiment=demo",
        f"assets_dir={assets}",
        f"trainer.max_steps={args.steps}",
        "loss.seq=0.3",
        "gate.enabled=true",
        "gate.mode=proxy",
        "gate.ratio=0",
        "resume=never",
        "trainer.progress_bar=false",
        *args.overrides,
    ]
    rows = train(2, overrides, out / "run", env)
    rss = [float(r["mem_rss_gb"]) for r in rows]
    after = rss[args.warmup :]
    steps = list(range(len(after)))
    slope = statistics.linear_regression(steps, after).slope  # GiB per step
    report = {
        **describe(env, 2),
        "steps": len(rows),
        "warmup_steps": args.warmup,
        "overrides": args.overrides,
        "skipped_nonfinite": int(float(rows[-1]["gate/nonfinite"])),
        "faults_injected": len(faults),
        "rss_gb_at_warmup_end": round(after[0], 4),
        "rss_gb_max_after_warmup": round(max(after), 4),
        "rss_gb_last": round(after[-1], 4),
        "rss_rise_mib_after_warmup": round((max(after) - after[0]) * 1024, 1),
        "rss_slope_mib_per_100_steps": round(slope * 1024 * 100, 2),
        "peak_rss_gb": round(max(float(r["mem_peak_rss_gb"]) for r in rows), 4),
        "step_s_median": round(statistics.median(float(r["step_time_s"]) for r in rows), 4),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
