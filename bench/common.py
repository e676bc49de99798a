"""What the benchmarks share: the environment of a run, assets, launching `launcher/train.py`
through the deepspeed launcher, and reading metrics.csv back."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's vkd_ds, installed or not


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_env(procs: int) -> dict[str, str]:
    """DeepSpeed's CPU accelerator without a GPU; the machine's cores split between the processes."""
    env = os.environ.copy()
    if not has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def describe(env: dict[str, str], procs: int) -> dict:
    return {
        "procs": procs,
        "threads_per_proc": int(env["OMP_NUM_THREADS"]),
        "glibc_tunables": env.get("GLIBC_TUNABLES", "default"),
        # What vkd-ds itself sets on CPU unless an override turns it off (vkd_ds/malloc.py).
        "vkd_ds_malloc": "mallopt: mmap threshold 32 MiB, no trim (trainer.keep_freed_memory=true)",
        "device": "cuda" if has_gpu() else "cpu",
    }


def bench_assets(out: Path, vocab_size: int, seq_len: int) -> Path:
    """The issue's shapes: a 4 × 256 Llama teacher, an exact vocabulary, `seq_len`-token records."""
    from vkd_ds.assets import write_bench_assets

    assets = out / f"assets_v{vocab_size}_t{seq_len}"
    if not (assets / "teacher").is_dir():
        write_bench_assets(assets, vocab_size, seq_len)
    return assets


def asset_overrides(assets: Path, seq_len: int) -> list[str]:
    """A short benchmark run on `assets`: no evals, no checkpoints but the last, no progress bar, and
    the mercy gate off (as when these benchmarks were first measured; bench/gate.py turns it on)."""
    from vkd_ds.assets import asset_overrides as paths

    return [
        *paths(assets),
        f"data.max_seq_len={seq_len}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "resume=never",
        "gate.enabled=false",
    ]


def train(procs: int, overrides: list[str], run_dir: Path, env: dict[str, str]) -> list[dict]:
    """One fresh vkd-ds run in `run_dir`; its metrics.csv rows. Exits with the job's stderr if it fails."""
    from vkd_ds.metrics import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time the bench runs
    from vkd_ds.launch import launcher_command

    cmd = launcher_command([*overrides, f"run.dir={run_dir}"], procs)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"benchmark run failed: {run_dir}")
    return read_metrics(run_dir / "metrics.csv")


def median_of(rows: list[dict], column: str, skip: int) -> float:
    return statistics.median(float(r[column]) for r in rows[skip:])


def run_parser(doc: str, steps: int, skip: int) -> argparse.ArgumentParser:
    """The options of every benchmark built on training runs; a bench adds its own, then parses."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--skip", type=int, default=skip, help="steps left out of the figures (warm-up)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run")
    return parser


def work_dir(out: str | None, name: str) -> Path:
    return Path(out or tempfile.mkdtemp(prefix=f"vkd-bench-{name}-"))
