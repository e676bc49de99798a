"""Which distillation objective makes the best student (issue #33), under two protocols, 3 seeds each.

    python bench/objectives.py pretraining  [--quick] [--seeds 1234 1 2] [--jobs 2] [--procs 1] [--out DIR]
    python bench/objectives.py posttraining [--quick] [--seeds 1234 1 2] [--jobs 2] [--procs 1] [--out DIR]

Both train on the demo's assets (teacher, tokenizer, corpus; --quick: the --quick demo's) for the demo's
steps (300; --quick: 80) with its global batch (8 packed rows of 256 tokens), with the mercy gate off.
The demo's train.jsonl is split: its last TUNE_RECORDS records are a validation split ("tune") on which
every choice (LR, λ) is made; the rest is trained on; valid.jsonl stays held out ("test") and reports.

pretraining: from a random student, matched controls. CE only; CE + the demo's extras (feature KD 0.05,
L_val 0.6, L_reg, valence weights λ 0.25) without soft KD; CE + λ·D for each divergence D without the
extras; the demo's full objective. Each arm's LR (and each divergence's λ) is picked by the lowest
validation perplexity of one seed over PRETRAIN_LRS × SOFT_LAMBDAS; the chosen setting then runs every
seed. Per FLOP: a KD step also pays the teacher's forward, so CE only runs once more with as many steps
as the same training FLOPs buy (6·N_student + 2·N_teacher per token against 6·N_student).

posttraining: from a supervised student: each seed's CE-only student of the pretraining protocol (its
chosen LR) is the start; every objective then trains for the same steps at POST_LR: CE (continued);
each divergence alone (λ 1, T 1); on-policy fractions 0.5 and 1 with forward and reverse KL; CE + λ·L_seq
with each reward, advantages raw or normalized, λ picked per (reward, normalization) from SEQ_LAMBDAS by
the lowest validation reverse KL of the student's own samples.

Every run is judged afterwards in one process (bench/judge.py): perplexity and KL(teacher‖student) per
token on text; the teacher's log-prob and KL(student‖teacher) per token of the student's own samples (32
tokens from the first 16 tokens of the first 32 records, the same draws for every run). Mean ± population
std over the seeds. Prints one JSON document; runs stay under --out, and a rerun reuses every run whose
result.json exists. --jobs runs that many trainings at once (--procs processes each, --procs ≤ 2: the
global batch stays 8 rows through gradient accumulation). State the allocator (GLIBC_TUNABLES) with times.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env, describe, train, work_dir  # noqa: E402
from judge import teacher_ppl  # noqa: E402

from vkd_ds.losses import DIVERGENCES  # noqa: E402
from vkd_ds.settings_sections import REWARDS  # noqa: E402
from vkd_ds.terms import loss_overrides  # noqa: E402

TUNE_RECORDS = 64
ROWS_PER_STEP, ROW_TOKENS = 8, 256  # the demo's global batch: 2 ranks x 4 packed rows of 256 tokens
PRETRAIN_LRS = (1e-3, 2e-3, 4e-3)
SOFT_LAMBDAS = (0.8, 4.0, 20.0)
POST_LR = 1e-3
SEQ_LAMBDAS = (0.003, 0.03, 0.3)
NO_WEIGHTS = "weighting.lam=0"
WIDENINGS = 2  # a sweep whose best point lies on its grid's edge widens that way, at most this often

# Every arm starts from `experiment=demo` and changes what it names. A "{soft}" / "{seq}" λ is swept.
PRETRAIN_ARMS: dict[str, list[str]] = {
    "ce_only": [*loss_overrides(ce=1.0), NO_WEIGHTS],
    "ce_extras": ["loss.soft=0"],  # the demo's objective without its soft term
    **{f"ce_{kind}": [*loss_overrides(ce=1.0, soft=-1), f"loss.divergence={kind}", NO_WEIGHTS] for kind in DIVERGENCES},
    "demo": [],
}
POST_ARMS: dict[str, list[str]] = {
    "ce_continued": [*loss_overrides(ce=1.0), NO_WEIGHTS],
    **{kind: [*loss_overrides(soft=1.0), f"loss.divergence={kind}", NO_WEIGHTS] for kind in DIVERGENCES},
    **{
        f"onpolicy{fraction:g}_{kind}": [
            *loss_overrides(soft=1.0),
            f"loss.divergence={kind}",
            f"onpolicy.fraction={fraction}",
            NO_WEIGHTS,
        ]
        for fraction in (0.5, 1.0)
        for kind in ("forward_kl", "reverse_kl")
    },
    **{
        f"seqkd_{reward}{'_normalized' if normalized else ''}": [
            *loss_overrides(ce=1.0, seq=-1),
            f"seq_kd.reward={reward}",
            f"seq_kd.normalize_advantages={str(normalized).lower()}",
            NO_WEIGHTS,
        ]
        for reward in REWARDS
        for normalized in (False, True)
    },
}
METRICS = ("ppl", "kl_teacher", "sample_teacher_logprob", "sample_reverse_kl")


def _swept(overrides: list[str], term: str, weight: float) -> list[str]:
    """The arm's overrides with its swept λ (written -1 in the arm) set to `weight`."""
    return [f"loss.{term}={weight}" if o == f"loss.{term}=-1" else o for o in overrides]


def split_assets(assets: Path, out: Path) -> Path:
    """The demo's assets with train.jsonl split into train (all but the last TUNE_RECORDS) and tune."""
    split = out / "assets_split"
    if (split / "tune.jsonl").is_file():
        return split
    split.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "tokenizer", "teacher_valence_head.safetensors"):
        (split / name).unlink(missing_ok=True)
        (split / name).symlink_to((assets / name).resolve())
    lines = (assets / "train.jsonl").read_text().splitlines(keepends=True)
    (split / "train.jsonl").write_text("".join(lines[:-TUNE_RECORDS]))
    (split / "test.jsonl").write_text((assets / "valid.jsonl").read_text())
    (split / "tune.jsonl.partial").write_text("".join(lines[-TUNE_RECORDS:]))
    (split / "tune.jsonl.partial").rename(split / "tune.jsonl")
    return split


def run_one(job: dict) -> dict:
    """Train one run (or read its result.json) and judge its exported student."""
    from judge import judge

    from vkd_ds.export import export

    run_dir = Path(job["dir"])
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    assets, steps, procs = Path(job["assets"]), job["steps"], job["procs"]
    overrides = [
        "experiment=demo",
        f"assets_dir={assets}",
        f"data.train_path={assets}/train.jsonl",
        f"data.valid_path={assets}/tune.jsonl",
        f"trainer.grad_accum={ROWS_PER_STEP // (4 * procs)}",
        f"trainer.max_steps={steps}",
        f"trainer.seed={job['seed']}",
        f"trainer.lr={job['lr']}",
        "trainer.eval_every=0",
        "trainer.eval_max_batches=1",  # judged below instead
        f"trainer.save_every={steps}",
        "trainer.progress_bar=false",
        "resume=never",
        "gate.enabled=false",
        *([f"student.path={job['student']}"] if job.get("student") else []),
        *job["overrides"],
    ]
    started = time.perf_counter()
    rows = train(procs, overrides, run_dir, job["env"])
    wall = time.perf_counter() - started
    export(run_dir, run_dir / "exported")
    import torch

    torch.set_num_threads(int(job["env"]["OMP_NUM_THREADS"]))
    splits = {"tune": assets / "tune.jsonl", "test": assets / "test.jsonl"}
    timed = rows[5:] if len(rows) > 10 else rows
    result = {
        "name": job["name"],
        "seed": job["seed"],
        "lr": job["lr"],
        "steps": steps,
        "overrides": job["overrides"],
        "train_wall_s": round(wall, 1),
        "step_s": statistics.median(float(r["step_time_s"]) for r in timed),
        **judge(run_dir / "exported", assets, splits),
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stdout_to_stderr() -> None:
    """A worker's prints (DeepSpeed's import warnings, progress bars) stay off the JSON on standard output."""
    sys.stdout = sys.stderr


class Runner:
    """Runs jobs `jobs` at a time; every run lives in out/<protocol>/<arm>/<setting>/seed<N>."""

    def __init__(self, args, assets: Path, out: Path):
        self.args, self.assets, self.out = args, assets, out
        self.env = bench_env(args.procs)
        self.env["OMP_NUM_THREADS"] = str(max(1, int(self.env["OMP_NUM_THREADS"]) // args.jobs))
        spawn = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=_stdout_to_stderr)
        self.extra = lambda arm, seed: {}  # what a protocol adds to an arm's jobs: its steps, its start

    def job(self, path: str, name: str, seed: int, lr: float, overrides: list[str], **extra) -> dict:
        return {
            "dir": str(self.out / path / f"seed{seed}"),
            "name": name,
            "seed": seed,
            "lr": lr,
            "overrides": overrides,
            "assets": str(self.assets),
            "steps": extra.pop("steps", self.args.steps),
            "procs": self.args.procs,
            "env": self.env,
            **extra,
        }

    def run(self, jobs: list[dict]) -> list[dict]:
        return list(self.pool.map(run_one, jobs))


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def summarize(runs: list[dict], split: str = "test") -> dict:
    return {key: mean_std([r[f"{split}/{key}"] for r in runs]) for key in METRICS} | {
        "step_s": mean_std([r["step_s"] for r in runs]),
        "train_wall_s": mean_std([r["train_wall_s"] for r in runs]),
    }


def points(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for dim, values in grid.items():
        points = [{**point, dim: value} for point in points for value in values]
    return points


def widened(grid: dict[str, list[float]], best: dict[str, float]) -> dict[str, list[float]]:
    """The grid one step wider (the same ratio) along every dimension whose best value lies on its edge."""
    wider = {}
    for dim, values in grid.items():
        values = sorted(values)
        if len(values) > 1 and best[dim] == values[-1]:
            values = [*values, values[-1] * values[-1] / values[-2]]
        elif len(values) > 1 and best[dim] == values[0]:
            values = [values[0] * values[0] / values[1], *values]
        wider[dim] = [float(f"{v:.3g}") for v in values]
    return wider


def sweep_and_choose(runner: Runner, protocol: str, grids: dict, lr: float | None, criterion: str) -> tuple[dict, dict]:
    """Per arm, every point of its grid at the first seed, and the point with the lowest tune/<criterion>.
    grids: {arm: (overrides, {"lr" or a term's λ: values})}; a grid without "lr" trains at `lr`. Where
    the best point lies on the grid's edge, the grid widens by one step that way and the new points run
    too (WIDENINGS times at most). Returns ({arm: {setting: value}}, {arm: the chosen setting})."""
    seed = runner.args.seeds[0]
    grids = {arm: (overrides, dict(grid)) for arm, (overrides, grid) in grids.items()}
    for _ in range(WIDENINGS + 1):
        jobs, keys = [], []
        for arm, (overrides, grid) in grids.items():
            for point in points(grid):
                setting = "_".join(f"{dim}{value:g}" for dim, value in point.items())
                swept = overrides
                for term, weight in point.items():
                    swept = swept if term == "lr" else _swept(swept, term, weight)
                point_lr = point.get("lr", lr)
                path = f"{protocol}/{arm}/{setting}"
                jobs.append(runner.job(path, arm, seed, point_lr, swept, **runner.extra(arm, seed)))
                keys.append((arm, point, setting, point_lr, swept))
        sweep: dict[str, dict] = {}
        chosen: dict[str, dict] = {}
        for (arm, point, setting, point_lr, swept), result in zip(keys, runner.run(jobs), strict=True):
            score = result[f"tune/{criterion}"]
            sweep.setdefault(arm, {})[setting] = round(score, 4)
            if arm not in chosen or score < chosen[arm]["tune"]:
                chosen[arm] = {"setting": setting, "point": point, "lr": point_lr, "overrides": swept, "tune": score}
        wider = {arm: (o, widened(grid, chosen[arm]["point"])) for arm, (o, grid) in grids.items()}
        # The dimensions along which a best point lies on its grid's edge (after the last widening too).
        edges = {arm: [dim for dim in grid if wider[arm][1][dim] != grid[dim]] for arm, (_, grid) in grids.items()}
        if wider == grids:
            break
        grids = wider
    for arm, best in chosen.items():
        best["on_edge"] = edges[arm]
    return sweep, chosen


def every_seed(runner: Runner, protocol: str, chosen: dict) -> dict[str, list[dict]]:
    jobs, arms = [], []
    for arm, best in chosen.items():
        for seed in runner.args.seeds:
            extra = runner.extra(arm, seed)
            path = f"{protocol}/{arm}/{best['setting']}"
            jobs.append(runner.job(path, arm, seed, best["lr"], best["overrides"], **extra))
            arms.append(arm)
    runs: dict[str, list[dict]] = {}
    for arm, result in zip(arms, runner.run(jobs), strict=True):
        runs.setdefault(arm, []).append(result)
    return runs


def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def pretraining_grid(overrides: list[str]) -> tuple[list[str], dict]:
    grid = {"lr": list(PRETRAIN_LRS)}
    return overrides, (grid | {"soft": list(SOFT_LAMBDAS)} if "loss.soft=-1" in overrides else grid)


def pretraining(runner: Runner) -> dict:
    runner.extra = lambda arm, seed: {}
    grids = {arm: pretraining_grid(overrides) for arm, overrides in PRETRAIN_ARMS.items()}
    sweep, chosen = sweep_and_choose(runner, "pretraining", grids, None, "ppl")
    runs = every_seed(runner, "pretraining", chosen)
    # The same training FLOPs for CE only: a KD step also runs the teacher's forward (2·N_T per token).
    first = runs["ce_only"][0]
    n_student, n_teacher = first["student_params"], first["teacher_params"]
    kd_ratio = (6 * n_student + 2 * n_teacher) / (6 * n_student)
    flops_steps = round(runner.args.steps * kd_ratio)
    best = chosen["ce_only"]
    matched = {**best, "setting": f"{best['setting']}_steps{flops_steps}"}
    runner.extra = lambda arm, seed: {"steps": flops_steps}
    runs |= {
        "ce_only_same_flops": every_seed(runner, "pretraining", {"ce_only_same_flops": matched})["ce_only_same_flops"]
    }
    chosen["ce_only_same_flops"] = matched
    tokens = runner.args.steps * ROWS_PER_STEP * ROW_TOKENS
    table = {}
    for arm, arm_runs in runs.items():
        uses_teacher = arm not in ("ce_only", "ce_only_same_flops")
        per_token = 6 * n_student + (2 * n_teacher if uses_teacher else 0)
        steps = arm_runs[0]["steps"]
        table[arm] = {
            "chosen": {key: chosen[arm][key] for key in ("lr", "setting", "on_edge") if key in chosen[arm]},
            "train_flops": per_token * steps * ROWS_PER_STEP * ROW_TOKENS,
            **summarize(arm_runs),
        }
    return {
        "protocol": "pretraining",
        "criterion": "tune/ppl",
        "sweep_lrs": PRETRAIN_LRS,
        "sweep_soft_lambdas": SOFT_LAMBDAS,
        "params": {"student_non_embedding": n_student, "teacher_non_embedding": n_teacher},
        "train_tokens": tokens,
        "kd_flops_ratio": round(kd_ratio, 3),
        "arms": PRETRAIN_ARMS,
        "sweep_tune_ppl": sweep,
        "results": table,
        "runs": runs,
    }


def posttraining(runner: Runner) -> dict:
    # The warm starts: each seed's CE-only student of the pretraining protocol, at its chosen LR.
    runner.extra = lambda arm, seed: {}
    ce_grid = {"ce_only": pretraining_grid(PRETRAIN_ARMS["ce_only"])}
    _, ce_chosen = sweep_and_choose(runner, "pretraining", ce_grid, None, "ppl")
    starts = every_seed(runner, "pretraining", ce_chosen)["ce_only"]
    start_dir = runner.out / "pretraining/ce_only" / ce_chosen["ce_only"]["setting"]
    start_of = {r["seed"]: start_dir / f"seed{r['seed']}" / "exported" for r in starts}
    runner.extra = lambda arm, seed: {"student": str(start_of[seed])}
    fixed = {arm: o for arm, o in POST_ARMS.items() if "loss.seq=-1" not in o}
    chosen = {arm: {"setting": lr_name(POST_LR), "lr": POST_LR, "overrides": o} for arm, o in fixed.items()}
    seq_arms = {arm: o for arm, o in POST_ARMS.items() if arm not in fixed}
    seq_grids = {arm: (o, {"seq": list(SEQ_LAMBDAS)}) for arm, o in seq_arms.items()}
    sweep, seq_chosen = sweep_and_choose(runner, "posttraining", seq_grids, POST_LR, "sample_reverse_kl")
    runs = every_seed(runner, "posttraining", chosen | seq_chosen)
    table = {"start (CE only)": {"chosen": {"lr": ce_chosen["ce_only"]["lr"]}, **summarize(starts)}}
    for arm, arm_runs in runs.items():
        setting = (chosen | seq_chosen)[arm]["setting"]
        table[arm] = {"chosen": {"lr": POST_LR, "setting": setting}, **summarize(arm_runs)}
    return {
        "protocol": "posttraining",
        "lr": POST_LR,
        "seq_criterion": "tune/sample_reverse_kl",
        "sweep_seq_lambdas": SEQ_LAMBDAS,
        "arms": POST_ARMS,
        "sweep_tune_sample_reverse_kl": sweep,
        "results": table,
        "runs": runs,
    }


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=("pretraining", "posttraining"))
    parser.add_argument("--quick", action="store_true", help="the --quick demo's assets and 80 steps")
    parser.add_argument("--assets", default=None, help="demo assets (default: built under --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--procs", type=int, default=1, choices=(1, 2), help="processes per training")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from vkd_ds.demo import FULL, QUICK, build_assets

    demo = QUICK if args.quick else FULL
    args.steps = args.steps or demo.distill_steps
    out = work_dir(args.out, "objectives")
    assets = Path(args.assets) if args.assets else out / "assets"
    # Standard output is the JSON document: the assets' and export's progress lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        if not args.assets:
            build_assets(assets, demo)
        runner = Runner(args, split_assets(assets, out), out)
        report = pretraining(runner) if args.protocol == "pretraining" else posttraining(runner)
        runner.pool.shutdown()
    env = runner.env
    header = {**describe(env, args.procs), "jobs": args.jobs, "quick": args.quick, "steps": args.steps}
    split = runner.assets
    header["teacher"] = teacher_ppl(split, {"tune": split / "tune.jsonl", "test": split / "test.jsonl"})
    print(json.dumps({**header, "seeds": args.seeds, "tune_records": TUNE_RECORDS, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
