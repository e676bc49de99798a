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

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "off": ["gate.enabled=false"],
    "proxy": ["gate.enabled=true", "gate.mode=proxy", "gate.ratio=0"],
    "lookahead": ["gate.enabled=true", "gate.mode=lookahead", "gate.ratio=0"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="vkd-bench-gate-"))
    env = os.environ.copy()
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.procs)))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    assets = out / "assets"
    if not (assets / "teacher").is_dir():
        subprocess.run(
            [sys.executable, "-c", f"from vkd_ds.assets import write_tiny_assets; write_tiny_assets({str(assets)!r})"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
    common = [
        f"teacher.path={assets / 'teacher'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.valid_path={assets / 'valid.jsonl'}",
        f"data.tokenizer_path={assets / 'tokenizer'}",
        f"valence.teacher_head={assets / 'teacher_valence_head.safetensors'}",
        "data.max_seq_len=128",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "loss.seq=0",
        "resume=never",
        *args.overrides,
    ]
    report: dict = {
        "procs": args.procs,
        "steps": args.steps,
        "threads_per_proc": int(env["OMP_NUM_THREADS"]),
        "glibc_tunables": env.get("GLIBC_TUNABLES", "default"),
        "overrides": args.overrides,
    }
    for mode, overrides in MODES.items():
        run_dir = out / mode
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.procs)]
        cmd += ["launcher/train.py", *common, *overrides, f"run.dir={run_dir}"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-4000:])
            return 1
        from vkd_ds.metrics import read_metrics

        rows = read_metrics(run_dir / "metrics.csv")
        times = [float(r["step_time_s"]) for r in rows[args.skip :]]
        report[mode] = {"median_step_s": round(statistics.median(times), 4), "steps_timed": len(times)}
    base = report["off"]["median_step_s"]
    for mode in ("proxy", "lookahead"):
        report[mode]["overhead"] = round(report[mode]["median_step_s"] / base - 1, 4)
    print(json.dumps(report))
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
