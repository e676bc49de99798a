"""`loss.chunk_tokens=auto` against fixed chunk sizes (issue #18): time of CE + soft KD, forward and
backward, at vocabularies 8,192, 32,768 and 151,936, on the logits path and the fused-LM-head path.

    python bench/chunk_tokens.py [--tokens 2048] [--vocab 8192 32768 151936] [--repeats 3]
                                 [--fixed 16 32 64 128 256 512 1024] [--paths logits fused]

Each (vocabulary, path, chunk size) runs in a fresh process with vkd-ds's CPU allocator setting
(vkd_ds/malloc.py, as training applies it), one warm-up and `--repeats` timed repeats (median). The
logits path: fp32 student and teacher logits [tokens, V] (what CPU training holds), CE + forward KL at
T = 4 (losses.token_ce + token_divergence). The fused path: hidden states [tokens, 256] and an LM head
[V, 256] (losses.fused_head_losses). `auto` is what training plans for this machine
(losses.plan_chunk_rows with the free memory now). `--device cuda`: on a GPU, in bf16, with the
GPU's plan (bench/gpu_check.py runs it). Reports every time and auto's ratio to the best
fixed one (target <= 1.10). Prints one JSON document. State the allocator (GLIBC_TUNABLES).
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
HIDDEN = 256


def run_case(path: str, vocab: int, tokens: int, chunk: str, repeats: int, device: str) -> dict:
    import torch

    from vkd_ds.losses import Divergence, fused_head_losses, plan_chunk_rows, token_ce, token_divergence
    from vkd_ds.malloc import keep_freed_memory
    from vkd_ds.memory import free_device_bytes

    on_gpu = device == "cuda"
    if not on_gpu:
        keep_freed_memory()
    torch.set_default_device(device)
    dtype = torch.bfloat16 if on_gpu else torch.float32  # what training holds there
    free = free_device_bytes(on_gpu, 1)  # as training plans: before the step's tensors exist
    torch.manual_seed(0)
    batch = 8
    seq = tokens // batch
    mask = torch.ones(batch, seq, dtype=torch.bool)
    targets = torch.randint(0, vocab, (batch, seq))
    teacher = torch.randn(batch, seq, vocab).mul_(2).to(dtype)
    divergence = Divergence("forward_kl", 4.0)
    fused = path == "fused"
    rows = int(chunk) if chunk != "auto" else plan_chunk_rows(vocab, HIDDEN, dtype, on_gpu, free, fused=fused)
    if path == "logits":
        student = torch.randn(batch, seq, vocab).mul_(2).to(dtype).requires_grad_(True)
        leaves = [student]

        def step():
            ce = token_ce(student, targets, mask, vocab, rows)
            soft = token_divergence(student, teacher, mask, "forward_kl", 4.0, vocab_size=vocab, chunk_tokens=rows)
            return ce.sum() + soft.sum()
    else:
        hidden = torch.randn(batch, seq, HIDDEN).to(dtype).requires_grad_(True)
        weight = (torch.randn(vocab, HIDDEN) * HIDDEN**-0.5).to(dtype).requires_grad_(True)
        leaves = [hidden, weight]

        def step():
            ce, soft = fused_head_losses(hidden, weight, None, mask, targets, teacher, divergence, vocab, rows)
            return ce.sum() + soft.sum()

    times = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        step().backward()
        if on_gpu:
            torch.cuda.synchronize()
        if repeat:  # the first is the warm-up
            times.append(time.perf_counter() - started)
        for leaf in leaves:
            leaf.grad = None
    return {"path": path, "vocab": vocab, "chunk": chunk, "rows": rows, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 151936])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixed", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--paths", nargs="+", default=["logits", "fused"], choices=["logits", "fused"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        path, vocab, chunk = args.case.split(":")
        print(json.dumps(run_case(path, int(vocab), args.tokens, chunk, args.repeats, args.device)))
        return
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = []
    for path in args.paths:
        for vocab in args.vocab:
            row: dict = {"path": path, "vocab": vocab, "fixed": {}}
            for chunk in ["auto", *map(str, args.fixed)]:
                cmd = [sys.executable, __file__, "--case", f"{path}:{vocab}:{chunk}"]
                cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                lines = out.stdout.strip().splitlines()
                if not lines:
                    sys.stderr.write(out.stderr[-2000:])
                    raise SystemExit(f"case {path}:{vocab}:{chunk} failed")
                case = json.loads(lines[-1])
                if chunk == "auto":
                    row["auto"] = {"rows": case["rows"], "seconds": round(case["seconds"], 4)}
                else:
                    row["fixed"][chunk] = round(case["seconds"], 4)
            best = min(row["fixed"], key=row["fixed"].get)
            row["best_fixed"] = {"rows": int(best), "seconds": row["fixed"][best]}
            row["auto_vs_best"] = round(row["auto"]["seconds"] / row["fixed"][best], 3)
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    report = {
        "bench": "chunk_tokens",
        "command": " ".join(["python", "bench/chunk_tokens.py", *sys.argv[1:]]),
        "tokens": args.tokens,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(default allocator)"),
        "vkd_ds_malloc": "mallopt: mmap threshold 32 MiB, no trim (as trainer.keep_freed_memory=true)",
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "device": args.device,
        "target": "auto_vs_best <= 1.10",
        "results": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
