"""Peak memory and time of chunked vs dense soft KD, forward + backward (SPEC §2, issue #3).

    python bench/soft_kd_memory.py [--tokens 8192] [--vocab 32768 131072] [--repeats 3]

Each (vocab, implementation) runs in a fresh process so peaks do not mix. Memory is
the process's peak RSS during forward + backward minus its RSS just before (inputs
already allocated): the extra memory the loss needs. Time is the median of the
repeats. Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.

Dense is the formula on the full tensors, in fp32 when the inputs are fp32;
at 128k the inputs are bf16 (fp32 [8192, 131072] logits alone are 4 GiB each) and
dense computes in bf16, as a naive bf16 training loop would.
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


def _rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dense_soft_kd(student, teacher, mask, temperature):
    import torch.nn.functional as F

    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).float() * temperature**2
    m = mask.float()
    return (per_token * m).sum(1) / m.sum(1).clamp(min=1.0)


def run_case(impl: str, vocab: int, tokens: int, dtype_name: str, repeats: int, limit_gb: float) -> dict:
    import torch

    from vkd_ds.losses import soft_kd

    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    batch = 8
    seq = tokens // batch
    student = (torch.randn(batch, seq, vocab) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(batch, seq, vocab) * 2).to(dtype)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    seq_weights = torch.rand(batch)
    before = _rss_gb()
    times = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            if impl == "dense":
                loss = dense_soft_kd(student, teacher, mask, 4.0)
            else:
                loss = soft_kd(student, teacher, mask, 4.0)
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
        "extra_peak_gb": _peak_gb() - before,
        "seconds": statistics.median(times),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit of each case's process")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, vocab, dtype = args.case.split(":")
        print(json.dumps(run_case(impl, int(vocab), args.tokens, dtype, args.repeats, args.limit_gb)))
        return
    results = []
    for vocab in args.vocab:
        dtype = "float32" if vocab <= 32768 else "bfloat16"
        pair = {}
        for impl in ("dense", "chunked"):
            out = subprocess.run(
                [
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
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = out.stdout.strip().splitlines()
            pair[impl] = json.loads(lines[-1]) if lines else {"impl": impl, "error": out.stderr[-300:]}
        row = {"vocab": vocab, "tokens": args.tokens, "dtype": dtype, **pair}
        if "error" not in pair["dense"] and "error" not in pair["chunked"]:
            row["memory_ratio"] = pair["chunked"]["extra_peak_gb"] / pair["dense"]["extra_peak_gb"]
            row["time_ratio"] = pair["chunked"]["seconds"] / pair["dense"]["seconds"]
        results.append(row)
    report = {
        "bench": "soft_kd_memory",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(default allocator)"),
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "targets": {"memory_ratio": "<= 0.20", "time_ratio": "<= 1.2"},
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
