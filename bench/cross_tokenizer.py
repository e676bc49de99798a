"""Distillation across tokenizers (issue #34): how much of same-tokenizer KD's gain each cross-tokenizer soft
term recovers when the student's tokenizer is not the teacher's, measured in held-out bits per byte
(comparable across tokenizers), 3 seeds, every λ chosen on a validation split.

    python bench/cross_tokenizer.py [--quick] [--seeds 1234 1 2] [--jobs 2] [--widenings 2] [--out DIR]

The demo's assets (--quick: the --quick demo's): its teacher and its 2,048-token byte-level BPE
tokenizer ("A"). A second byte-level BPE tokenizer ("B": 1,024 tokens, every digit its own token) is
trained here on the same training text. The demo's train.jsonl is split as bench/objectives.py splits
it: its last 64 records are the validation split ("tune") on which every λ is chosen; the rest is
trained on; valid.jsonl stays held out ("test") and reports. Arms, each a 2-layer x 128 student trained
for the demo's steps on 16 unpacked rows of at most 128 tokens per step, CE plus what it names:
- `ce_only_A`, `ce_only_B`: CE only, on tokenizer A or B;
- `same_tokenizer_kd_A`: the reference, tokenizer A, CE + λ·forward KL (T = 1);
- `projected_B`, `aligned_B`, `positional_uld_B`: tokenizer B, the teacher on A, CE + λ·the soft term
  with loss.cross_tokenizer = projected, aligned or positional_uld (T = 1).
Every arm's LR (and λ) is picked by the lowest validation bits per byte of the first seed over its grid
(GRIDS), widened one step where the best lies on the grid's edge, at most twice (--widenings); the chosen setting then
runs every seed: matched controls, each at its own best.
Bits per byte = Σ −log₂ p_S(target) / Σ bytes of the targets, over every target token that is not a
special token. Share of the gain recovered: (bpb(ce_only_B) − bpb(arm)) / (bpb(ce_only_A) −
bpb(same_tokenizer_kd_A)), on the test split. 1 process per run with 1 thread, --jobs runs at once;
`GLIBC_TUNABLES` unset unless set. A rerun reuses every run whose result.json exists.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env, describe, train, work_dir  # noqa: E402
from objectives import WIDENINGS, points, split_assets, widened  # noqa: E402

from vkd_ds.terms import loss_overrides  # noqa: E402

B_VOCAB, ROWS_PER_STEP = 1024, 16
LRS = [2e-3, 4e-3, 8e-3]
ARMS: dict[str, tuple[str, list[str], dict[str, list[float]]]] = {
    "ce_only_A": ("A", [], {"lr": LRS}),
    "ce_only_B": ("B", [], {"lr": LRS}),
    "same_tokenizer_kd_A": ("A", ["loss.temperature=1.0"], {"lr": LRS, "soft": [1.0, 4.0, 20.0]}),
    **{
        f"{pairing}_B": (
            "B",
            ["loss.temperature=1.0", f"loss.cross_tokenizer={pairing}"],
            {"lr": LRS, "soft": [0.0625, 0.25, 1.0]},
        )
        for pairing in ("projected", "aligned", "positional_uld")
    },
}
CROSS_ARMS = [arm for arm in ARMS if arm.endswith("_B") and not arm.startswith("ce_")]


def tokenizer_b(assets: Path, out: Path) -> Path:
    from vkd_ds.assets import train_tokenizer

    folder = out / f"tokenizer_b{B_VOCAB}"
    if not (folder / "tokenizer.json").is_file():
        texts = [json.loads(line)["text"] for line in (assets / "train.jsonl").read_text().splitlines()]
        train_tokenizer(texts, B_VOCAB, folder, split_digits=True)
    return folder


def bits_per_byte(student_dir: Path, tokenizer_dir: Path, valid: Path) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.corpus import load_examples
    from vkd_ds.cross_tokenizer import byte_lengths
    from vkd_ds.data import collate
    from vkd_ds.losses import shift_for_next_token

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    examples, vocab = load_examples(valid, tokenizer, 128), len(tokenizer)
    nats = size = 0.0
    lengths = torch.tensor(byte_lengths(tokenizer, list(range(vocab))))
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16], tokenizer.pad_token_id)
            targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
            mask &= lengths[targets.clamp(max=vocab - 1)] > 0  # special tokens stand for no bytes
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = F.log_softmax(logits[..., :vocab].float(), -1).gather(-1, targets[..., None]).squeeze(-1)
            nats -= float(logp[mask].sum())
            size += float(lengths[targets][mask].sum())
    return nats / math.log(2) / size


def teacher_carried(assets: Path, tokenizer_b_dir: Path, student_b: Path, split="test", records=64) -> dict:
    """How well the teacher, carried onto tokenizer B by `projected` at the aligned positions (group
    ends), predicts B's targets there, next to the teacher's own bits per byte on all of its tokens and
    to `student_b`'s (an exported CE-only student on B) on the same group-end targets: the margin a soft
    term at group ends has to teach. Over the first `records` records of the split (truncated as
    training rows are: 128 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.cross_tokenizer import byte_lengths, projection, teacher_rows

    tok_a, tok_b = AutoTokenizer.from_pretrained(assets / "tokenizer"), AutoTokenizer.from_pretrained(tokenizer_b_dir)
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(student_b).eval()
    carry = projection(tok_b, tok_a)
    bytes_a, bytes_b = (torch.tensor(byte_lengths(t, list(range(len(t))))) for t in (tok_a, tok_b))
    names = ("teacher_own", "carried_group_ends", "ce_only_B_group_ends")
    sums = {name: [0.0, 0.0] for name in names}

    def add(name: str, logp: torch.Tensor, size: torch.Tensor) -> None:
        sums[name][0] -= float(logp[size > 0].sum()) / math.log(2)
        sums[name][1] += float(size.sum())

    lines = (assets / f"{split}.jsonl").read_text().splitlines()[:records]
    for text in (json.loads(line)["text"] for line in lines):
        ids = [tok_b.bos_token_id, *tok_b(text, add_special_tokens=False)["input_ids"][:126], tok_b.eos_token_id]
        rows = teacher_rows([ids], torch.ones(1, len(ids), dtype=torch.long), tok_b, tok_a)
        with torch.no_grad():
            logits = teacher(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[0, :, : len(tok_a)]
            student_logp = student(input_ids=torch.tensor([ids])).logits[0, :, : len(tok_b)].log_softmax(-1)
        own = rows.input_ids[0, 1:]
        add("teacher_own", logits[:-1].log_softmax(-1).gather(1, own[:, None])[:, 0], bytes_a[own])
        p = logits[rows.teacher[:, 1]].softmax(-1)
        carried = p.new_zeros(len(p), len(tok_b)).index_add_(1, carry, p)
        at = rows.student[:, 1]
        target = torch.tensor(ids)[at + 1]
        add("carried_group_ends", carried.gather(1, target[:, None])[:, 0].clamp(min=1e-30).log(), bytes_b[target])
        add("ce_only_B_group_ends", student_logp[at].gather(1, target[:, None])[:, 0], bytes_b[target])
    return {name: round(bits / size, 4) for name, (bits, size) in sums.items()}


def run_one(job: dict) -> dict:
    from vkd_ds.export import export

    run_dir = Path(job["dir"])
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    assets, tokenizer = Path(job["assets"]), Path(job["tokenizer"])
    teacher_tokenizer = [f"teacher.tokenizer_path={assets / 'tokenizer'}"] if job["side"] == "B" else []
    soft = any(o.startswith("loss.soft=") for o in job["overrides"])
    overrides = [
        "experiment=demo",
        f"assets_dir={assets}",
        f"data.train_path={assets}/train.jsonl",
        f"data.valid_path={assets}/tune.jsonl",
        f"data.tokenizer_path={tokenizer}",
        *teacher_tokenizer,
        *loss_overrides(ce=1.0, soft=1.0 if soft else 0.0),
        "weighting.lam=0",
        "gate.enabled=false",
        "data.packing=false",
        "trainer.micro_batch_size=8",
        f"trainer.grad_accum={ROWS_PER_STEP // 8}",
        f"trainer.max_steps={job['steps']}",
        f"trainer.seed={job['seed']}",
        "trainer.eval_every=0",
        "trainer.eval_max_batches=1",
        f"trainer.save_every={job['steps']}",
        "trainer.progress_bar=false",
        "resume=never",
        *job["overrides"],
    ]
    rows = train(1, overrides, run_dir, job["env"])
    export(run_dir, run_dir / "exported")
    result = {
        "arm": job["arm"],
        "seed": job["seed"],
        "overrides": job["overrides"],
        **{
            f"{split}/bpb": bits_per_byte(run_dir / "exported", tokenizer, assets / f"{split}.jsonl")
            for split in ("tune", "test")
        },
        "step_s": statistics.median(float(r["step_time_s"]) for r in rows[5:]),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stdout_to_stderr() -> None:
    sys.stdout = sys.stderr


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--assets", default=None, help="demo assets (default: built under --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="run these arms only")
    parser.add_argument(
        "--widenings", type=int, default=WIDENINGS, help="how often a grid widens at most where its best is on an edge"
    )
    args = parser.parse_args()
    arms = {arm: ARMS[arm] for arm in args.arms}
    from vkd_ds.demo import FULL, QUICK, build_assets

    demo = QUICK if args.quick else FULL
    out = work_dir(args.out, "cross_tokenizer")
    env = bench_env(1)
    env["OMP_NUM_THREADS"] = str(max(1, int(env["OMP_NUM_THREADS"]) // args.jobs))
    with contextlib.redirect_stdout(sys.stderr):
        demo_assets = Path(args.assets) if args.assets else out / "assets"
        if not args.assets:
            build_assets(demo_assets, demo)
        assets = split_assets(demo_assets, out)
        tokenizers = {"A": assets / "tokenizer", "B": tokenizer_b(assets, out)}
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=_stdout_to_stderr) as pool:

            def job(arm: str, setting: str, seed: int, side: str, overrides: list[str]) -> dict:
                return {
                    "dir": str(out / arm / setting / f"seed{seed}"),
                    "arm": arm,
                    "side": side,
                    "seed": seed,
                    "overrides": overrides,
                    "assets": str(assets),
                    "tokenizer": str(tokenizers[side]),
                    "steps": demo.distill_steps,
                    "env": env,
                }

            sweep, chosen = _sweep(pool, job, args.seeds[0], arms, args.widenings)
            rest = [
                job(arm, best["setting"], seed, ARMS[arm][0], best["overrides"])
                for arm, best in chosen.items()
                for seed in args.seeds[1:]
            ]
            runs = [*(best["result"] for best in chosen.values()), *pool.map(run_one, rest)]
    table = {}
    for arm in arms:
        values = [r["test/bpb"] for r in runs if r["arm"] == arm]
        table[arm] = {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4)}
    same_gain = table["ce_only_A"]["mean"] - table["same_tokenizer_kd_A"]["mean"]
    # Per cross-tokenizer arm: the share of the same-tokenizer gain it recovers, and whether its gain over
    # CE only on tokenizer B exceeds the larger of the two arms' seed spreads.
    ce_b = table["ce_only_B"]
    recovered = {
        arm: {
            "share": round((ce_b["mean"] - table[arm]["mean"]) / same_gain, 3) if same_gain else None,
            "gain_over_ce_only_B": round(ce_b["mean"] - table[arm]["mean"], 4),
            "beats_ce_only_B_beyond_spread": ce_b["mean"] - table[arm]["mean"] > max(ce_b["std"], table[arm]["std"]),
        }
        for arm in CROSS_ARMS
        if arm in arms
    }
    ce_only_b = out / "ce_only_B" / chosen["ce_only_B"]["setting"] / f"seed{args.seeds[0]}" / "exported"
    report = {
        **describe(env, 1),
        "jobs": args.jobs,
        "quick": args.quick,
        "steps": demo.distill_steps,
        "seeds": args.seeds,
        "widenings": args.widenings,
        "tokenizers": {"A": "the demo's (2,048 tokens)", "B": f"{B_VOCAB} tokens, digits split, trained here"},
        "arms": {arm: {"tokenizer": side, "overrides": o, "grid": grid} for arm, (side, o, grid) in arms.items()},
        "tune_bpb": sweep,
        "chosen": {arm: {**best["point"], "on_edge": best["on_edge"]} for arm, best in chosen.items()},
        "test_bits_per_byte": table,
        "share_of_same_tokenizer_gain": recovered,
        "teacher_bits_per_byte": teacher_carried(assets, tokenizers["B"], ce_only_b),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    return 0


def _sweep(pool, job, seed: int, arms: dict, widenings: int) -> tuple[dict, dict]:
    """Every arm's grid (of `arms`) at `seed`, widened where its best point lies on an edge (`widenings` times at most).
    ({arm: {setting: tune bpb}}, {arm: its best point, run, setting and overrides})."""
    grids = {arm: dict(grid) for arm, (_, _, grid) in arms.items()}
    results: dict[str, dict[str, dict]] = {arm: {} for arm in arms}

    def setting(point: dict[str, float]) -> str:
        return "_".join(f"{dim}{value:g}" for dim, value in point.items())

    def overrides(arm: str, point: dict[str, float]) -> list[str]:
        names = {"lr": "trainer.lr", "soft": "loss.soft"}
        return [*ARMS[arm][1], *(f"{names[dim]}={value}" for dim, value in point.items())]

    for _ in range(widenings + 1):
        todo = [(arm, p) for arm, grid in grids.items() for p in points(grid) if setting(p) not in results[arm]]
        jobs = [job(arm, setting(p), seed, ARMS[arm][0], overrides(arm, p)) for arm, p in todo]
        for (arm, p), result in zip(todo, pool.map(run_one, jobs), strict=True):
            results[arm][setting(p)] = result | {"point": p}
        best = {
            arm: min((results[arm][setting(p)] for p in points(grid)), key=lambda r: r["tune/bpb"])["point"]
            for arm, grid in grids.items()
        }
        wider = {arm: widened(grid, best[arm]) for arm, grid in grids.items()}
        # The dimensions along which a best point lies on its grid's edge (after the last widening too).
        edges = {arm: [dim for dim in grid if wider[arm][dim] != grid[dim]] for arm, grid in grids.items()}
        if wider == grids:
            break
        grids = wider
    chosen = {
        arm: {
            "point": best[arm],
            "setting": setting(best[arm]),
            "overrides": overrides(arm, best[arm]),
            "result": results[arm][setting(best[arm])],
            "on_edge": edges[arm],
        }
        for arm in arms
    }
    sweep = {arm: {name: round(r["tune/bpb"], 4) for name, r in sorted(results[arm].items())} for arm in arms}
    return sweep, chosen


if __name__ == "__main__":
    sys.exit(main())
