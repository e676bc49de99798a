"""The GPU checks of issue #8 in one run (what `bench/gpu_check.sh` starts); one JSON summary.

    python bench/gpu_check.py [--out DIR] [--smoke]

1. the device-agnostic unit tests (eval sums, GPU index, RNG entries, bf16 backward rounding, configs);
2. a bf16 demo-sized distillation with every term on (the demo's 4 x 192 teacher and 2 x 128 student
   shapes, random weights, vocabulary 2048, 128 tokens): 4 steps straight, and 2 steps + a
   checkpoint + resume to 4, whose losses must match (the largest relative difference is reported:
   CUDA kernels with atomics, e.g. index_add, need not repeat the last digits); then export,
   reloaded with transformers;
3. a NaN gradient injected at step 3 (VKD_FAULT_NAN_GRAD): the step is skipped and counted;
4. grad_accum 1 against 2 (micro-batch 8 against 4 x 2) in bf16: the largest relative loss drift;
5. bench/teacher_offload.py and 6. bench/kd_mfu.py (1.1 B teacher, 141 M student);
7. bench/chunk_tokens.py --device cuda (issue #18): `loss.chunk_tokens=auto`'s plan on the GPU against
   fixed chunk sizes at vocabularies 32,768 and 151,936, logits and fused-head paths, bf16.

One process (one GPU). The summary so far is written to DIR/summary.json (and stderr) after each
check, so a run cut short still tells what it saw. `--smoke` runs everything at toy size on a machine
without a GPU, to check that the script itself works (its figures mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, asset_overrides, bench_env, describe, train, work_dir  # noqa: E402


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def max_relative_diff(rows: list[dict], reference: list[dict], column: str = "loss") -> float:
    pairs = zip(rows, reference, strict=True)
    return max(abs(float(a[column]) - float(b[column])) / abs(float(b[column])) for a, b in pairs)


def save(summary: dict, out: Path) -> None:
    """The summary so far, to DIR/summary.json and stderr: a check cut short still tells what it saw."""
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    print(json.dumps(summary), file=sys.stderr, flush=True)


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any machine")
    args = parser.parse_args()
    out = work_dir(args.out, "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    env = bench_env(1)
    summary: dict = {**describe(env, 1), "smoke": args.smoke}
    started = time.time()

    tests = run([sys.executable, "-m", "pytest", "-q", "tests/test_devices.py", "tests/test_losses.py",
                 "tests/test_config.py"], env)  # fmt: skip
    summary["unit_tests"] = {"passed": tests.returncode == 0, "tail": tests.stdout.strip().splitlines()[-1:]}
    save(summary, out)

    from vkd_ds.assets import write_bench_assets

    vocab, seq_len, width = (384, 48, 48) if args.smoke else (2048, 128, 192)
    assets = out / "assets"
    if not (assets / "teacher").is_dir():
        write_bench_assets(assets, vocab, seq_len, records=160, teacher_layers=4, teacher_width=width)
    every_term = [
        "experiment=demo", f"assets_dir={assets}", *asset_overrides(assets, seq_len), "deepspeed.precision=bf16",
        "loss.seq=0.3", "seq_kd.n_gen=8", "feat.attention=0.5", "reg.param_patterns=[*norm.weight]",
        "trainer.micro_batch_size=8", "trainer.warmup_steps=2", "resume=auto", "trainer.eval_max_batches=2",
    ]  # fmt: skip
    if args.smoke:
        every_term += ["student.config.hidden_size=32", "student.config.intermediate_size=64",
                       "student.config.num_attention_heads=2", "student.config.num_key_value_heads=2"]  # fmt: skip
    four = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2"]
    straight = train(1, every_term + four, out / "straight", env)
    train(1, every_term + four + ["trainer.stop_after_steps=2"], out / "resumed", env)
    # train() starts each run fresh: the resumed half continues in place through the launcher.
    from vkd_ds.launch import launcher_command

    resumed_run = run(launcher_command([*every_term, *four, f"run.dir={out / 'resumed'}"], 1), env)
    from vkd_ds.metrics import read_metrics

    resumed = read_metrics(out / "resumed" / "metrics.csv")
    exported = run([sys.executable, "-m", "vkd_ds.cli", "export", str(out / "straight"), str(out / "exported")], env)
    reload = run([sys.executable, "-c", "import sys, torch; from transformers import AutoModelForCausalLM as M; "
                  "m = M.from_pretrained(sys.argv[1]); "
                  "assert all(torch.isfinite(p).all() for p in m.parameters()); print('ok')",
                  str(out / "exported")], env)  # fmt: skip
    summary["bf16_every_term"] = {
        "losses": [float(r["loss"]) for r in straight],
        "all_finite": all(float(r["loss"]) == float(r["loss"]) for r in straight),
        "resume_ok": resumed_run.returncode == 0,
        "resume_max_relative_loss_diff": max_relative_diff(resumed, straight),
        "export_reloads": exported.returncode == 0 and reload.stdout.strip() == "ok",
        "eval_ppl": float(straight[-1]["eval/ppl"]),
        "peak_gpu_gb": max((float(r["mem_gpu_gb"]) for r in straight if r.get("mem_gpu_gb")), default=None),
        "tokens_per_s": float(straight[-1]["tokens_per_s"]),
    }
    save(summary, out)

    nan_env = {**env, "VKD_FAULT_NAN_GRAD": "3:0"}
    nan_rows = train(1, every_term + ["trainer.max_steps=5", "trainer.eval_every=0"], out / "nan", nan_env)
    summary["nan_gradient"] = {
        "step_kept": [int(r["gate/step_kept"]) for r in nan_rows],
        "nonfinite": [int(r["gate/nonfinite"]) for r in nan_rows],
        "skipped_and_counted": [r["gate/step_kept"] for r in nan_rows] == ["1", "1", "0", "1", "1"],
    }
    save(summary, out)

    base = every_term + ["trainer.max_steps=4", "trainer.eval_every=0", "deepspeed=zero2"]
    accum1 = train(1, base + ["trainer.micro_batch_size=8", "trainer.grad_accum=1"], out / "accum1", env)
    accum2 = train(1, base + ["trainer.micro_batch_size=4", "trainer.grad_accum=2"], out / "accum2", env)
    summary["grad_accum_1_vs_2"] = {"max_relative_loss_drift": max_relative_diff(accum1, accum2)}
    save(summary, out)

    size = ["--size", "tiny"] if args.smoke else []
    offload = run([sys.executable, "bench/teacher_offload.py", "--procs", "1", "--out", str(out / "offload")]
                  + (["--steps", "4", "--skip", "1"] if args.smoke else []), env)  # fmt: skip
    summary["teacher_offload"] = last_json(offload.stdout) if offload.returncode == 0 else offload.stderr[-800:]
    save(summary, out)
    mfu = run([sys.executable, "bench/kd_mfu.py", "--procs", "1", "--out", str(out / "mfu"), *size]
              + (["--steps", "4", "--skip", "1"] if args.smoke else []), env, timeout=1800)  # fmt: skip
    summary["kd_mfu"] = last_json(mfu.stdout) if mfu.returncode == 0 else mfu.stderr[-800:]
    save(summary, out)
    chunk_args = ["--device", "cpu", "--tokens", "64", "--vocab", "1024", "--fixed", "8", "16", "--repeats", "1"]
    if not args.smoke:
        chunk_args = ["--device", "cuda", "--tokens", "8192", "--vocab", "32768", "151936"]
        chunk_args += ["--fixed", "64", "256", "512", "1024", "2048", "4096"]
    chunks = run([sys.executable, "bench/chunk_tokens.py", *chunk_args], env)
    summary["chunk_tokens"] = last_json(chunks.stdout) if chunks.returncode == 0 else chunks.stderr[-800:]
    summary["seconds"] = round(time.time() - started, 1)
    save(summary, out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
