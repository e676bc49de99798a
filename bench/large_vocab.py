"""Distillation steps at vocabularies 128,256 (Llama 3) and 151,936 (Qwen 2/3) (issue #18): peak memory
and time per step on the logits path and the fused-LM-head path.

    python bench/large_vocab.py [--vocab 128256 151936] [--steps 8] [--skip 2] [--out DIR] [overrides ...]

The bench shapes of bench/step_cost.py at these vocabularies: a 4 × 256 Llama teacher, the default
2 × 128 student, 256-token records, 4 sequences per rank and step, 2 processes × 1 thread, CE + soft
KD at T = 4, ZeRO-3 teacher offloaded to CPU, `loss.chunk_tokens=auto` (the plan is in each run's
train.log). `logits`: the student's [tokens, vocab] logits and the chunked loss over them;
`fused`: `loss.fused_head=true`, CE and soft KD from the last hidden state and the LM head, so the
student's logits never exist (the teacher's still do). Reports the median step time after `--skip`
steps and the largest rank's peak RSS during training (metrics.csv `mem_peak_rss_gb`). Prints one
JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_assets, bench_env, describe, median_of, run_parser, train, work_dir  # noqa: E402

from vkd_ds.terms import only_terms  # noqa: E402

SEQ_LEN = 256


def main() -> int:
    parser = run_parser(__doc__, steps=8, skip=2)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    parser.add_argument("--paths", nargs="+", default=["logits", "fused"], choices=["logits", "fused"])
    args = parser.parse_args()
    out = work_dir(args.out, "large_vocab")
    env = bench_env(args.procs)
    report: dict = {**describe(env, args.procs), "steps": args.steps, "overrides": args.overrides, "results": []}
    for vocab in args.vocab:
        assets = bench_assets(out, vocab, SEQ_LEN)
        common = asset_overrides(assets, SEQ_LEN) + [
            *only_terms("ce", "soft"),
            "weighting.lam=0",
            f"trainer.max_steps={args.steps}",
            f"trainer.micro_batch_size={8 // args.procs}",
            "trainer.eval_max_batches=1",
            *args.overrides,
        ]
        for path in args.paths:
            run_dir = out / f"run_v{vocab}_{path}"
            rows = train(
                args.procs, common + [f"loss.fused_head={'true' if path == 'fused' else 'false'}"], run_dir, env
            )
            plan = next(
                line.split("; ")[-1]
                for line in (run_dir / "train.log").read_text().splitlines()
                if "tokens per chunk" in line
            )
            result = {
                "vocab": vocab,
                "path": path,
                "median_step_s": round(median_of(rows, "step_time_s", args.skip), 3),
                "peak_rss_gb_max_rank": round(max(float(r["mem_peak_rss_gb"]) for r in rows), 3),
                "chunk_plan": plan,
                "loss_first_last": [round(float(rows[0]["loss"]), 4), round(float(rows[-1]["loss"]), 4)],
            }
            if rows[-1].get("mem_gpu_gb"):
                result["peak_gpu_gb"] = round(max(float(r["mem_gpu_gb"]) for r in rows), 3)
            print(json.dumps(result), file=sys.stderr)
            report["results"].append(result)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
