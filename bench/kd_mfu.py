"""Model-FLOPs utilization of a distillation step (issue #8): a Llama teacher of 1.1 B parameters
(2048 wide, 18 layers, 16 heads, vocabulary 32000) distilled into a student of 141 M (768 wide,
12 layers, 12 heads), CE + soft KD, bf16, one process (--procs N: N GPUs), teacher on ZeRO-3 kept
on the device.

    python bench/kd_mfu.py [--size gpu|tiny] [--steps 12] [--skip 4] [--peak-tflops 989] [--out DIR] [overrides ...]

FLOPs of one step, counted from the shapes (the PaLM appendix-B convention; causal masking not
halved; the input embedding lookup counts nothing, the LM head's matmul counts):

    tokens · (6·N_S + 2·N_T) + tokens · S · (12·L_S·d_S + 4·L_T·d_T)

N the parameters outside the input embedding, L layers, d width, S the sequence length; the
student's forward and backward (6), the teacher's forward only (2). MFU = FLOPs per step / median
step time / peak. The peak is the accelerator's dense bf16 rate: 989 TFLOP/s for an H100/H200 SXM
(pass --peak-tflops for another). `--size tiny` runs the same bench at toy size on any machine (its
MFU means nothing; it checks that the bench runs). Prints one JSON document.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, asset_overrides, bench_env, describe, median_of, run_parser, train, work_dir  # noqa: E402

from vkd_ds.terms import only_terms  # noqa: E402

# (teacher layers, width, heads), (student layers, width, heads, intermediate), vocabulary,
# tokens per record, micro batch
SIZES = {
    "gpu": ((18, 2048, 16), (12, 768, 12, 2304), 32000, 1024, 8),
    "tiny": ((2, 64, 4), (2, 32, 2, 64), 512, 64, 2),
}


def non_embedding_params(layers: int, width: int, intermediate: int, vocab: int) -> int:
    """Llama: attention 4·d², SwiGLU MLP 3·d·i, two RMSNorms per layer, the final norm, the LM head."""
    return layers * (4 * width * width + 3 * width * intermediate + 2 * width) + width + vocab * width


def main() -> int:
    parser = run_parser(__doc__, steps=12, skip=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.set_defaults(procs=1)  # one process per GPU; --procs N for N GPUs
    args = parser.parse_args()
    (t_layers, t_width, t_heads), (s_layers, s_width, s_heads, s_inter), vocab, seq_len, micro = SIZES[args.size]
    out = work_dir(args.out, "mfu")
    env = bench_env(args.procs)
    assets = out / f"assets_{args.size}"
    if not (assets / "teacher").is_dir():
        sys.path.insert(0, str(REPO))
        from vkd_ds.assets import write_bench_assets

        write_bench_assets(
            assets, vocab, seq_len, records=8 * micro * args.procs, teacher_layers=t_layers,
            teacher_width=t_width, teacher_heads=t_heads,
        )  # fmt: skip
    overrides = asset_overrides(assets, seq_len) + [
        *only_terms("ce", "soft"), "weighting.lam=0",
        "deepspeed=zero2", "deepspeed.precision=bf16", "teacher.offload_param=none",
        f"student.config.hidden_size={s_width}", f"student.config.intermediate_size={s_inter}",
        f"student.config.num_hidden_layers={s_layers}", f"student.config.num_attention_heads={s_heads}",
        f"student.config.num_key_value_heads={s_heads}",
        f"trainer.micro_batch_size={micro}", f"trainer.max_steps={args.steps}", *args.overrides,
    ]  # fmt: skip
    rows = train(args.procs, overrides, out / "run", env)
    step_s = median_of(rows, "step_time_s", args.skip)
    # Every record is exactly seq_len tokens, seq_len - 1 of them targets (metrics.csv's `tokens`), so
    # this holds whatever grad_accum or batch an override sets.
    tokens = round(float(rows[-1]["tokens"]) / (seq_len - 1)) * seq_len
    n_teacher = non_embedding_params(t_layers, t_width, 3 * t_width, vocab)
    n_student = non_embedding_params(s_layers, s_width, s_inter, vocab)
    attention = tokens * seq_len * (12 * s_layers * s_width + 4 * t_layers * t_width)
    flops = tokens * (6 * n_student + 2 * n_teacher) + attention
    report = {
        **describe(env, args.procs),
        "size": args.size,
        "teacher_params_non_embedding": n_teacher,
        "student_params_non_embedding": n_student,
        "tokens_per_step": tokens,
        "median_step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "tflops_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step_s / 1e12, 2),
        "peak_tflops": args.peak_tflops,
        "mfu": round(flops / step_s / 1e12 / args.peak_tflops / args.procs, 4),
        "peak_gpu_gb": max((float(r["mem_gpu_gb"]) for r in rows if r.get("mem_gpu_gb")), default=None),
        "overrides": args.overrides,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
