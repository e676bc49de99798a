"""Peak memory and time of chunked vs dense soft KD, forward + backward (docs/objective.md, issue #3).

    python bench/soft_kd_memory.py [--tokens 8192] [--vocab 32768 128256 151936] [--repeats 3]

Each (vocab, implementation) runs in a fresh process so peaks do not mix. Memory is
the process's peak RSS (VmHWM, reset just before) during forward + backward minus
its RSS just before (inputs already allocated): the extra memory the loss needs,
the gradient w.r.t. the student's logits included. Time is the median of the
repeats. Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.

Cases: fp32 logits at 32k; bf16 logits (what GPU training holds) at 32k, 128,256 (Llama 3) and
151,936 (Qwen 2/3).
`dense` is the objective's formula on the whole tensors in fp32 (bf16 inputs upcast);
`dense_native` computes in the logits' dtype, as a naive bf16 loop would. Chunked
uses `loss.chunk_tokens` positions per fp32 chunk (`auto`, the default: what training plans on
this machine, losses.plan_chunk_rows; glibc's default allocator, as the figures were first
taken). A case that exceeds the address-space limit reports its error instead of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def dense_soft_kd(student, teacher, mask, temperature):
    import torch.nn.functional as F

    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).float() * temperature**2
    m = mask.float()
    return (per_token * m).sum(1) / m.sum(1).clamp(min=1.0)


def dense_native_soft_kd(student, teacher, mask, temperature):
    import torch.nn.functional as F

    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).float() * temperature**2
    m = mask.float()
    return (per_token * m).sum(1) / m.sum(1).clamp(min=1.0)


def run_case(
    impl: str, vocab: int, tokens: int, dtype_name: str, repeats: int, limit_gb: float, chunk_tokens: str
) -> dict:
    import torch

    from vkd_ds.losses import plan_chunk_rows, token_divergence
    from vkd_ds.memory import GIB, free_device_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    if chunk_tokens == "auto":
        chunk_tokens = plan_chunk_rows(vocab, 256, dtype, False, free_device_bytes(False, 1))
    chunk_tokens = int(chunk_tokens)
    batch = 8
    seq = tokens // batch
    student = torch.randn(batch, seq, vocab, dtype=dtype).mul_(2).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, dtype=dtype).mul_(2)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    seq_weights = torch.rand(batch)
    before = rss_bytes() / GIB
    reset_peak_rss()
    times = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            if impl == "dense":
                loss = dense_soft_kd(student, teacher, mask, 4.0)
            elif impl == "dense_native":
                loss = dense_native_soft_kd(student, teacher, mask, 4.0)
            else:
                loss = token_divergence(student, teacher, mask, "forward_kl", 4.0, chunk_tokens=chunk_tokens)
            (loss * seq_weights).sum().backward()
            times.append(time.perf_counter() - started)
            student.grad = None
            del loss
    except (RuntimeError, MemoryError) as err:
        return {"impl": impl, "vocab": vocab, "dtype": dtype_name, "error": str(err).splitlines()[0][:200]}
    return {
        "impl": impl,
        "vocab": vocab,
        "tokens": tokens,
        "dtype": dtype_name,
        "inputs_gb": 2 * student.numel() * student.element_size() / 2**30,
        "extra_peak_gb": peak_rss_bytes() / GIB - before,
        "seconds": statistics.median(times),
        "repeats": repeats,
        **({"chunk_tokens": chunk_tokens} if impl == "chunked" else {}),
    }


CASES = [(32768, "float32"), (32768, "bfloat16"), (128256, "bfloat16"), (151936, "bfloat16")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="only these vocabulary sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", default="auto", help="loss.chunk_tokens: auto (the default) or a number")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit of each case's process")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, vocab, dtype = args.case.split(":")
        result = run_case(impl, int(vocab), args.tokens, dtype, args.repeats, args.limit_gb, args.chunk_tokens)
        print(json.dumps(result))
        return
    results = []
    for vocab, dtype in CASES:
        if args.vocab and vocab not in args.vocab:
            continue
        impls = ("dense", "chunked") if dtype == "float32" else ("dense", "dense_native", "chunked")
        row = {"vocab": vocab, "tokens": args.tokens, "dtype": dtype}
        for impl in impls:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                f"{impl}:{vocab}:{dtype}",
                "--tokens",
                str(args.tokens),
                "--repeats",
                str(args.repeats),
                "--limit-gb",
                str(args.limit_gb),
                "--chunk-tokens",
                str(args.chunk_tokens),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = out.stdout.strip().splitlines()
            if lines:
                row[impl] = json.loads(lines[-1])
            else:  # killed (the kernel's OOM killer sends SIGKILL, exit -9) or crashed
                row[impl] = {"impl": impl, "error": f"exit {out.returncode}: {out.stderr[-300:]}".strip()}
        chunked = row["chunked"]
        for impl in impls[:-1]:
            if "error" not in row[impl] and "error" not in chunked:
                row[f"memory_ratio_vs_{impl}"] = chunked["extra_peak_gb"] / row[impl]["extra_peak_gb"]
                row[f"time_ratio_vs_{impl}"] = chunked["seconds"] / row[impl]["seconds"]
        results.append(row)
    report = {
        "bench": "soft_kd_memory",
        "command": " ".join(["python", "bench/soft_kd_memory.py", *sys.argv[1:]]),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(default allocator)"),
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "targets": {"memory_ratio": "<= 0.20", "time_ratio": "<= 1.2"},
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
