"""Which distillation objective makes the best student (issue #10): every token-level divergence
off-policy, on-policy fractions with forward and reverse KL, and sequence KD with each reward, on
the demo's assets, several seeds each.

    python bench/objectives.py [--quick] [--seeds 1234 1 2] [--steps N] [--arms NAME ...]
                               [--assets DIR] [--out DIR] [--procs 2] [overrides ...]

Each run is the demo's distillation (`experiment=demo`, 2 processes, ZeRO-3) with one arm's
overrides, for --steps steps (default: the demo's, 300; 80 with --quick, on the --quick assets).
Per run: held-out perplexity and KL to the teacher (eval.json), the median step time (after 5
warm-up steps; on-policy runs also split by on- and off-policy steps) and the teacher's mean
log-prob per token of the final student's samples: the exported student samples --probe-tokens
tokens from the prompts (first 16 tokens) of the first --probe held-out records, with the same
per-row seeded draws for every run, and the teacher scores them (one process, no DeepSpeed).
Per arm: mean ± std over the seeds (population std, n = number of seeds). Prints one JSON document;
with --out the runs stay there, and a rerun reuses every run whose result file exists.
State the allocator (GLIBC_TUNABLES) with any time figure.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env, describe, train, work_dir  # noqa: E402

from vkd_ds.losses import DIVERGENCES  # noqa: E402
from vkd_ds.seq_kd import REWARDS  # noqa: E402
from vkd_ds.terms import loss_overrides  # noqa: E402

# The demo's objective is the base of every arm (configs/experiment/demo.yaml): CE, the token-level
# divergence, feature KD, L_val, L_reg and the valence weights. Arms change only what they name.
ARMS: dict[str, list[str]] = {f"offpolicy_{kind}": [f"loss.divergence={kind}"] for kind in DIVERGENCES}
for fraction in (0.5, 1.0):
    for kind in ("forward_kl", "reverse_kl"):
        ARMS[f"onpolicy{fraction:g}_{kind}"] = [f"onpolicy.fraction={fraction}", f"loss.divergence={kind}"]
for reward in REWARDS:
    ARMS[f"seqkd_{reward}"] = ["loss.seq=0.3", f"seq_kd.reward={reward}"]
ARMS["seqkd_teacher_logprob_length_normalized"] = ["loss.seq=0.3", "seq_kd.length_normalized=true"]
ARMS["ce_only"] = [*loss_overrides(ce=1.0), "weighting.lam=0"]


def probe_teacher_logprob(run_dir: Path, assets: Path, probes: int, n_gen: int) -> float:
    """The teacher's mean log-prob per token of the final student's samples on the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.corpus import load_examples
    from vkd_ds.export import export
    from vkd_ds.losses import shift_for_next_token, token_logprobs
    from vkd_ds.rollout import SamplingSettings, prompt_of, rollout_batch, row_uniforms, sample

    student_dir = run_dir / "exported"
    if not (student_dir / "config.json").is_file():
        export(run_dir, student_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    settings = SamplingSettings(n_gen=n_gen, prompt_tokens=16, max_seq_len=128)
    records = load_examples(assets / "valid.jsonl", tokenizer, 128)[:probes]
    prompts = [prompt_of(ex, settings) for ex in records]
    uniforms = row_uniforms(0, 0, list(range(len(prompts))), n_gen)
    vocab = len(tokenizer)
    samples = sample(student, prompts, uniforms, settings, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = rollout_batch(samples, tokenizer.pad_token_id)
    targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = token_logprobs(logits, targets, mask, vocab)
    return float(logprobs.sum() / mask.sum())


def one_run(arm: str, seed: int, args, assets: Path, out: Path, env: dict) -> dict:
    run_dir = out / arm / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = [
        "experiment=demo",
        f"assets_dir={assets}",
        f"trainer.max_steps={args.steps}",
        f"trainer.seed={seed}",
        f"trainer.eval_every={args.steps}",
        f"trainer.save_every={args.steps}",
        "trainer.progress_bar=false",
        "resume=never",
        "gate.enabled=false",  # measured before the gate was on by default (issue #17)
        *ARMS[arm],
        *args.overrides,
    ]
    rows = train(args.procs, overrides, run_dir, env)
    timed = rows[5:] if len(rows) > 10 else rows
    final = json.loads((run_dir / "eval.json").read_text())
    result = {
        "arm": arm,
        "seed": seed,
        "ppl": final["eval/ppl"],
        "kl_teacher": final.get("eval/kl_teacher"),
        "step_s": statistics.median(float(r["step_time_s"]) for r in timed),
        "sample_teacher_logprob": probe_teacher_logprob(run_dir, assets, args.probe, args.probe_tokens),
    }
    for kind, flag in (("onpolicy_step_s", "1"), ("offpolicy_step_s", "0")):
        times = [float(r["step_time_s"]) for r in timed if r.get("onpolicy") == flag]
        if times and any(r.get("onpolicy") for r in timed):
            result[kind] = statistics.median(times)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the --quick demo's assets and 80 steps")
    parser.add_argument("--assets", default=None, help="demo assets (default: built under --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--probe", type=int, default=32, help="held-out prompts the final student continues")
    parser.add_argument("--probe-tokens", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run")
    args = parser.parse_args()
    from vkd_ds.demo import FULL, QUICK, build_assets

    demo = QUICK if args.quick else FULL
    args.steps = args.steps or demo.distill_steps
    out = work_dir(args.out, "objectives")
    assets = Path(args.assets) if args.assets else out / "assets"
    env = bench_env(args.procs)
    # Standard output is the JSON document: the assets' and export's progress lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        if not args.assets:
            build_assets(assets, demo)
        runs = [one_run(arm, seed, args, assets, out, env) for arm in args.arms for seed in args.seeds]
    table = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {
            key: mean_std([r[key] for r in mine])
            for key in ("ppl", "kl_teacher", "sample_teacher_logprob", "step_s", "onpolicy_step_s", "offpolicy_step_s")
            if all(r.get(key) is not None for r in mine)
        }
    best = min(table, key=lambda arm: table[arm]["ppl"]["mean"])
    report = {
        **describe(env, args.procs),
        "assets": str(assets),
        "quick": args.quick,
        "steps": args.steps,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "arms": {arm: ARMS[arm] for arm in args.arms},
        "results": table,
        "best_ppl": best,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
