"""vkd-ds against a minimal hand-written PyTorch KD loop on the same models and data (issue #7).

    python bench/plain_kd.py [--setting speed|memory|both] [--vocab N] [--vkd-only] [--steps 12] [--skip 2] [--out DIR]

Both sides: one process, fp32, the issue's 4 × 256 Llama teacher and the default 2 × 128 student,
batch 8, CE + soft KD (λ 1 and 0.8, T = 4), AdamW with gradient clipping at 1.0. vkd-ds runs
through the deepspeed launcher with ZeRO-0 (the teacher where the config's layout puts it: since
issue #31, `auto`, whole in the one process; before, ZeRO-3 inference offloaded to CPU), valence
weights off (weighting.lam=0). The plain loop is below:
full-vocabulary logits, `log_softmax`, `kl_div` and `cross_entropy`, as one would write it.

Settings: `speed` (vocabulary 8192, 256 tokens; target vkd-ds ≥ 0.9 × the plain loop's tokens/s)
and `memory` (vocabulary 32768, 512 tokens; target a lower peak RSS than the plain loop, from
chunked losses); `--vocab N` runs a setting at another vocabulary (e.g. 151936, issue #31's
second workload), `--vkd-only` skips the plain loop (which needs about 6 x [tokens, vocab] fp32 there).
Tokens/s is the median over the steps after `--skip`, counting predicted tokens;
peak memory is vkd-ds's training peak (metrics.csv's `mem_peak_rss_gb`: since the engines were
built, the largest of the steps) and the plain loop's process peak (ru_maxrss). All cores go to the one process.
vkd-ds tunes glibc's allocator (trainer.keep_freed_memory); the plain loop runs both as written
and with the same setting (`plain_tuned_malloc`), so the ratios show what the framework itself buys.
Prints one JSON document. State the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, asset_overrides, bench_assets, bench_env, describe, median_of, train  # noqa: E402

from vkd_ds.terms import loss_overrides  # noqa: E402

SETTINGS = {"speed": (8192, 256), "memory": (32768, 512)}
BATCH, CE, SOFT, TEMPERATURE = 8, 1.0, 0.8, 4.0
VKD = [
    "deepspeed=zero0",
    f"trainer.micro_batch_size={BATCH}",
    *loss_overrides(ce=CE, soft=SOFT),
    f"loss.temperature={TEMPERATURE}",
    "weighting.lam=0",
    "trainer.lr=1e-3",
]


def plain_loop(assets: Path, seq_len: int, steps: int, skip: int, tuned: bool) -> dict:
    """The reference: what a KD step is without any framework; `tuned`: with vkd-ds's glibc setting."""
    import resource

    if tuned:
        from vkd_ds.malloc import keep_freed_memory

        keep_freed_memory()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.assets import llama_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), 128, 2, max_positions=2048)).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rows = [json.loads(line)["text"] for line in (assets / "train.jsonl").read_text().splitlines()]
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)][:seq_len] for t in rows]
    rates = []
    for step in range(steps):
        batch = torch.tensor([ids[(step * BATCH + i) % len(ids)] for i in range(BATCH)])
        started = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(batch).logits[:, :-1]
        logits = student(batch).logits[:, :-1]
        targets = batch[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        kl = F.kl_div(
            F.log_softmax(logits / TEMPERATURE, -1).reshape(-1, logits.shape[-1]),
            F.log_softmax(teacher_logits / TEMPERATURE, -1).reshape(-1, logits.shape[-1]),
            log_target=True,
            reduction="batchmean",
        )
        loss = CE * ce + SOFT * TEMPERATURE**2 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(targets.numel() / (time.perf_counter() - started))
    return {
        "tokens_per_s": statistics.median(rates[skip:]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="the setting's vocabulary instead of its own")
    parser.add_argument("--vkd-only", action="store_true", help="skip the plain loop")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--plain", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop here
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(Path(args.plain), args.seq_len, args.steps, args.skip, args.tuned)))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="vkd-bench-plain-"))
    env = bench_env(1)
    report: dict = {**describe(env, 1), "batch": BATCH, "steps": args.steps, "skip": args.skip}
    for name in SETTINGS if args.setting == "both" else [args.setting]:
        vocab, seq_len = SETTINGS[name]
        vocab = args.vocab or vocab
        assets = bench_assets(out, vocab, seq_len)
        overrides = asset_overrides(assets, seq_len) + VKD + [f"trainer.max_steps={args.steps}"]
        rows = train(1, overrides, out / f"vkd_{name}", env)
        ours = {
            "tokens_per_s": median_of(rows, "tokens_per_s", args.skip),
            "peak_rss_gb": max(float(r["mem_peak_rss_gb"]) for r in rows),
            "final_loss": float(rows[-1]["loss"]),
        }
        report[name] = {"vocab": vocab, "seq_len": seq_len, "vkd_ds": {k: round(v, 4) for k, v in ours.items()}}
        # The plain loop as written, and with the glibc setting vkd-ds applies (trainer.keep_freed_memory).
        for label, extra in () if args.vkd_only else (("plain", []), ("plain_tuned_malloc", ["--tuned"])):
            command = [sys.executable, __file__, "--plain", str(assets), "--seq-len", str(seq_len), *extra]
            command += ["--steps", str(args.steps), "--skip", str(args.skip)]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                return 1
            plain = json.loads(done.stdout.strip().splitlines()[-1])
            report[name][label] = {k: round(v, 4) for k, v in plain.items()}
            report[name][f"speed_ratio_vs_{label}"] = round(ours["tokens_per_s"] / plain["tokens_per_s"], 4)
            report[name][f"memory_ratio_vs_{label}"] = round(ours["peak_rss_gb"] / plain["peak_rss_gb"], 4)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
