"""A billion-parameter teacher on 2 CPU ranks (issue #18): does any rank ever hold the whole teacher?

    python bench/large_teacher.py [--out DIR] [--steps 4] [--offload cpu nvme] [--precision fp32]
                                  [--hidden 2048] [--layers 22] [--vocab 32000] [-- overrides ...]

The teacher is a randomly initialized Llama of TinyLlama's shape (2048 wide, 22 layers, MLP 5632,
32 heads, 4 key/value heads, vocabulary 32,000: 1.10 B parameters), written once as sharded
safetensors in bf16 (1 GiB files, 2.2 GB in all) and read by vkd-ds's loader
(vkd_ds/teacher_load/), shard by shard, into each rank's ZeRO-3 partition, in the run's precision
(fp32 by default on CPU: 4.4 GB of weights, 2.2 GB per rank). The student is the default config's
(2 × 128) at the same vocabulary. CE + soft KD, 128-token records, one sequence per rank and step.
Overrides go after `--` (--offload takes several values).

For each `--offload` (teacher.offload_param) it reports, per rank: the teacher weights it holds, its
peak RSS while the teacher engine is built (startup.json, vkd_ds/train.py) and during training
(metrics.csv `mem_peak_rss_gb`, the largest rank's, reset when training starts), the time from
the process's start to the end of the first step, and the median step time. The target: every
rank's peak <= teacher bytes / 2 + student state (16 bytes per parameter: weights, gradients, Adam)
+ 1.5 GB. Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import asset_overrides, bench_assets, bench_env, describe, median_of, run_parser, train, work_dir  # noqa: E402

from vkd_ds.terms import only_terms  # noqa: E402

GB = 1e9
SHARD_BYTES = 2**30


def write_teacher(directory: Path, hidden: int, layers: int, vocab: int, seq_len: int) -> dict:
    """A random Llama teacher as sharded bf16 safetensors with an index, one tensor at a time (this
    process never holds more than one shard). Skipped when `directory` already holds it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
    )
    index_path = directory / "model.safetensors.index.json"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    parameters = sum(math.prod(shape) for shape in shapes.values())
    if not index_path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        generator = torch.Generator().manual_seed(0)
        shard, shard_bytes, weight_map, files = {}, 0, {}, []

        def flush():
            nonlocal shard, shard_bytes
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            files.append(name)
            weight_map.update({key: name for key in shard})
            shard, shard_bytes = {}, 0

        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            if shard and shard_bytes + tensor.numel() * 2 > SHARD_BYTES:
                flush()
            shard[name] = tensor
            shard_bytes += tensor.numel() * 2
        flush()
        index = {"metadata": {"total_size": parameters * 2}, "weight_map": weight_map}
        index_path.write_text(json.dumps(index, indent=2))
    files = sorted({p.name for p in directory.glob("model-*.safetensors")})
    return {
        "parameters": parameters,
        "shape": {"hidden": hidden, "layers": layers, "intermediate": config.intermediate_size, "vocab": vocab},
        "files": len(files),
        "stored_dtype": "bf16",
        "stored_gb": round(sum((directory / f).stat().st_size for f in files) / GB, 3),
    }


def student_parameters(vocab: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from vkd_ds.config import compose
    from vkd_ds.models import student_config_from_dict

    config = student_config_from_dict(dict(compose([]).student.config), vocab)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def main() -> int:
    parser = run_parser(__doc__, steps=4, skip=1)
    parser.add_argument("--offload", nargs="+", default=["cpu"], choices=["none", "cpu", "nvme"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    out = work_dir(args.out, "large_teacher")
    env = bench_env(args.procs)
    assets = bench_assets(out, args.vocab, args.seq_len)
    teacher_dir = out / f"teacher_{args.hidden}x{args.layers}_v{args.vocab}"
    teacher = write_teacher(teacher_dir, args.hidden, args.layers, args.vocab, args.seq_len)
    bytes_per = 4 if args.precision == "fp32" else 2
    teacher_bytes = teacher["parameters"] * bytes_per
    student = student_parameters(args.vocab)
    target_gb = (teacher_bytes / args.procs + 16 * student) / GB + 1.5
    report: dict = {
        **describe(env, args.procs),
        "teacher": {**teacher, "precision": args.precision, "bytes_gb": round(teacher_bytes / GB, 3)},
        "student_parameters": student,
        "target_peak_rss_gb_per_rank": round(target_gb, 3),
        "steps": args.steps,
        "overrides": args.overrides,
    }
    common = asset_overrides(assets, args.seq_len) + [
        f"teacher.path={teacher_dir}",
        *only_terms("ce", "soft"),
        "weighting.lam=0",
        "valence.teacher_head=null",
        f"deepspeed.precision={args.precision}",
        f"trainer.max_steps={args.steps}",
        "trainer.micro_batch_size=1",
        f"trainer.global_batch_size={args.procs}",
        "trainer.eval_max_batches=1",
        *args.overrides,
    ]
    for offload in args.offload:
        run_dir = out / f"run_{offload}"
        extra = [f"teacher.offload_param={offload}"]
        if offload == "nvme":
            extra.append(f"teacher.nvme_path={out / 'nvme'}")
        rows = train(args.procs, common + extra, run_dir, env)
        startup = json.loads((run_dir / "startup.json").read_text())
        load = startup["teacher_load"]
        ranks = [
            {
                "teacher_weights_gb": round(r["weights_gb"] * 2**30 / GB, 3),
                "peak_rss_loading_gb": round(r["peak_rss_gb"] * 2**30 / GB, 3),
                "rss_before_loading_gb": round(r["rss_before_gb"] * 2**30 / GB, 3),
            }
            for r in load["ranks"]
        ]
        training_peak = max(float(r["mem_peak_rss_gb"]) for r in rows) * 2**30 / GB
        worst = max(training_peak, *(r["peak_rss_loading_gb"] for r in ranks))
        report[f"offload_{offload}"] = {
            "ranks": ranks,
            "peak_rss_training_gb_max_rank": round(training_peak, 3),
            "teacher_load_s": round(load["seconds"], 1),
            "time_to_first_step_s": round(startup["time_to_first_step_s"], 1),
            "median_step_s": round(median_of(rows, "step_time_s", args.skip), 2),
            "within_target": worst <= target_gb,
        }
        print(json.dumps({offload: report[f"offload_{offload}"]}), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
