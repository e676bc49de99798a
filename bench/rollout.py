"""Student generation speed under ZeRO-3: gathered once per rollout vs synced per token (issue #4).

    python bench/rollout.py [--procs 2] [--layers 4] [--hidden 256] [--vocab 8192]
                            [--batch 8] [--prompt 32] [--n-gen 64] [--repeats 3]

Starts the deepspeed launcher with `--procs` processes (DeepSpeed's CPU accelerator
and gloo when there is no GPU). Each rank builds the same Llama student on a ZeRO-3
engine and samples `--n-gen` tokens for `--batch` prompts of `--prompt` tokens, with
`rollout.gather_student=always` (full parameters copied into a plain model once per
rollout, the copy's time included) and `never` (the ZeRO-3 module all-gathers every
layer at every token). Tokens/s counts the generated tokens of all ranks over the
slowest rank's time; median of the repeats after one warm-up each. Rank 0 prints one
JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(argv: list[str]) -> int:
    import torch

    env = os.environ.copy()
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = parse(argv).procs
    # One process per "device": share the cores instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    from vkd_ds.launch import launcher_command

    cmd = launcher_command(["--worker", *argv], procs, script=__file__)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        return result.returncode or 1
    print(lines[-1][len("BENCH ") :])
    return 0


def worker(args: argparse.Namespace) -> None:
    import torch

    from vkd_ds import dist, engines
    from vkd_ds.assets import llama_config
    from vkd_ds.config import compose
    from vkd_ds.ds_config import student_ds_config, student_lr_schedule
    from vkd_ds.rollout import SamplingSettings, StudentSampler, row_uniforms
    from vkd_ds.settings import Settings

    dist.init()
    # Only the student's engine is built: no teacher, no valence head.
    overrides = ["teacher.path=/unused", "data.train_path=/unused", "trainer.micro_batch_size=1"]
    cfg = Settings.from_config(compose([*overrides, "loss.val=0", "weighting.lam=0", "gate.enabled=false"]))
    ds_config = student_ds_config(cfg, dist.world_size(), dist.on_gpu())
    model_config = llama_config(args.vocab, args.hidden, args.layers, heads=max(1, args.hidden // 64))
    student = engines.build_student_model(None, model_config, ds_config, seed=0)
    engine, _, _ = engines.build_student_engine(student, ds_config, student_lr_schedule(cfg, ds_config))
    settings = SamplingSettings(n_gen=args.n_gen, max_seq_len=args.prompt + args.n_gen)
    gen = torch.Generator().manual_seed(dist.rank())
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=gen).tolist()
    rows = [dist.rank() * args.batch + r for r in range(args.batch)]
    results = {}
    for mode in ("always", "never"):
        sampler = StudentSampler(engine, mode)
        times = []
        for repeat in range(args.repeats + 1):
            uniforms = row_uniforms(0, repeat, rows, args.n_gen)
            dist.barrier()
            started = time.perf_counter()
            samples = sampler(prompts, uniforms, settings, args.vocab, None, 0)
            elapsed = float(dist.all_reduce_max(torch.tensor([time.perf_counter() - started]))[0])
            if repeat > 0:  # the first is a warm-up
                times.append(elapsed)
        tokens = int(dist.all_reduce_sum(torch.tensor([float(sum(samples.lengths))]))[0])
        seconds = statistics.median(times)
        results[sampler.mode] = {
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
        }
    if dist.is_main():
        report = {
            "device": "cuda" if dist.on_gpu() else "cpu",
            "procs": dist.world_size(),
            "student": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab},
            "batch_per_rank": args.batch,
            "prompt_tokens": args.prompt,
            "n_gen": args.n_gen,
            "threads": torch.get_num_threads(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "default"),
            **results,
            "speedup_gathered_vs_synced": round(
                results["gathered"]["tokens_per_s"] / results["synced"]["tokens_per_s"], 2
            ),
        }
        print("BENCH " + json.dumps(report), flush=True)


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    parsed = parse(argv)
    if parsed.worker:
        worker(parsed)
    else:
        sys.exit(launch(argv))
