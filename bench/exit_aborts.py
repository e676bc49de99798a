"""How often a 2-rank job aborts at exit: the interpreter's teardown vs vkd-ds's `launch.leave`.

    python bench/exit_aborts.py [--jobs 60] [--parallel 3] [--mode teardown|leave|both]

Each job is the deepspeed launcher with 2 CPU ranks that join the gloo group (vkd_ds.dist.init),
all-reduce, barrier and exit: through the interpreter's normal teardown (`teardown`), or through
`launch.leave(0)` as vkd-ds's ranks do (`leave`). A job fails when the launcher's status is not 0
or a rank printed "terminate called without an active exception". Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def worker(mode: str) -> None:
    import torch

    from vkd_ds import dist

    dist.init()
    dist.all_reduce_sum(torch.ones(4))
    dist.barrier()
    if mode == "leave":
        from vkd_ds.launch import leave

        leave(0)


def one_job(mode: str) -> bool:
    from vkd_ds.launch import launcher_command

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = launcher_command(["--worker", mode], 2, script=__file__)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    return result.returncode != 0 or "terminate called without an active exception" in output


def main() -> int:
    if "--worker" in sys.argv:  # a rank: the launcher put --local_rank=N first
        worker(sys.argv[sys.argv.index("--worker") + 1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--parallel", type=int, default=3, help="jobs at a time (load makes aborts likelier)")
    parser.add_argument("--mode", choices=("teardown", "leave", "both"), default="both")
    args = parser.parse_args()
    modes = ("teardown", "leave") if args.mode == "both" else (args.mode,)
    summary = {"jobs_per_mode": args.jobs, "parallel": args.parallel, "cpus": os.cpu_count()}
    for mode in modes:
        with ThreadPoolExecutor(args.parallel) as pool:
            failed = sum(pool.map(one_job, [mode] * args.jobs))
        summary[f"{mode}_failed"] = failed
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
