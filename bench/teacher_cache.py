"""The teacher cache (issue #16): what it costs to write and store, what a cached step costs, and
what student it makes.

    python bench/teacher_cache.py cost    [--vocab 32000] [--seq-len 256] [--steps 30] [--temperatures 1 4]
                                          [--repeats 3] [--out DIR]
    python bench/teacher_cache.py quality [--quick] [--seeds 1234 1 2] [--ks 8 64 256] [--assets DIR]
                                          [--out DIR]

`cost`: on the bench assets (a 4 × 256 Llama teacher, an exact vocabulary, 96 records of --seq-len
tokens), `vkd-ds cache-teacher` at top-k 64, fp16, with the valence head (k = 8): bytes per token
and positions written per second (2 ranks). Then three runs of --steps steps on the same shapes,
2 ranks, ZeRO-3: the live teacher (CE + token KD + L_val + valence weights), the same objective
from the cache (teacher not loaded), and CE only. Per run: median step time (after --skip warm-up
steps, the median over --repeats interleaved runs) and the largest rank's peak RSS over the run
(loading included). All of it at each of --temperatures (loss.temperature, and the cache's T).

`quality`: the demo's assets and distillation (`experiment=demo`, 300 steps; --quick: the quick
demo's, 80 steps) with feature KD off (the cache does not serve it), from the live teacher and from
caches of top-k --ks (fp16), several seeds each: held-out perplexity and KL to the teacher (as the
run's eval measures it: for a cached run the bucketed KL; and `kl_teacher_live`, the final student's
KL to the whole teacher by `vkd-ds eval` with it), mean ± population std over the seeds.

Prints one JSON document; with --out the runs stay there, and `quality` reuses runs whose result
file exists. State the allocator (GLIBC_TUNABLES) with any time figure.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    asset_overrides,
    bench_assets,
    bench_env,
    describe,
    median_of,
    run_parser,
    train,
    work_dir,
)

from vkd_ds.terms import loss_overrides  # noqa: E402

# What the cache serves, as the live run does it: CE, token KD, L_val and the valence weights.
SERVED = [*loss_overrides(ce=1.0, soft=0.8, val=0.6, reg=1e-5), "weighting.lam=1.0"]
CE_ONLY = [*loss_overrides(ce=1.0), "weighting.lam=0"]


def cache_teacher(procs: int, overrides: list[str], cache_dir: Path, env: dict) -> tuple[dict, float]:
    """`vkd-ds cache-teacher` (its ranks under the launcher, as the command starts them): the manifest
    and the wall time."""
    from vkd_ds.launch import launcher_command
    from vkd_ds.teacher_cache import CACHE_TEACHER_FLAG

    started = time.perf_counter()
    cmd = launcher_command([CACHE_TEACHER_FLAG, *overrides, f"cache.dir={cache_dir}"], procs)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"cache-teacher failed: {cache_dir}")
    return json.loads((cache_dir / "manifest.json").read_text()), time.perf_counter() - started


def cached(cache_dir: Path) -> list[str]:
    return ["teacher.path=null", f"teacher.cache={cache_dir}"]


def cost(args) -> dict:
    out = work_dir(args.out, "teacher-cache")
    env = bench_env(args.procs)
    assets = bench_assets(out, args.vocab, args.seq_len)
    report = {
        **describe(env, args.procs),
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "skip": args.skip,
    }
    for temperature in args.temperatures:
        report[f"T={temperature:g}"] = cost_at(args, out, env, assets, temperature)
    return report


def cost_at(args, out: Path, env: dict, assets: Path, temperature: float) -> dict:
    """The cache's write and a cached step against the live teacher and CE only, at one temperature (the
    cache holds the teacher at it; at T = 1 CE and token KD share one softmax of the student)."""
    base = [
        *asset_overrides(assets, args.seq_len),
        f"trainer.max_steps={args.steps}",
        f"loss.temperature={temperature}",
        *args.overrides,
    ]
    cache_dir = out / f"cache_v{args.vocab}_k64_T{temperature:g}"
    if not (cache_dir / "manifest.json").is_file():
        manifest, wall = cache_teacher(args.procs, [*base, "cache.top_k=64"], cache_dir, env)
    else:
        manifest, wall = json.loads((cache_dir / "manifest.json").read_text()), None
    runs = {
        "live_teacher": [*base, *SERVED],
        "cached_teacher": [*base, *SERVED, *cached(cache_dir)],
        "ce_only": [*base, *CE_ONLY],
    }
    # Interleaved repeats (A B C A B C): this machine's step times drift by 10-20 % between runs.
    seen: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, overrides in runs.items():
            seen[name].append(
                _figures(train(args.procs, overrides, out / f"{name}_T{temperature:g}_{repeat}", env), args)
            )
    results = {
        name: {
            "step_s": statistics.median(f["step_s"] for f in figures),
            "step_s_per_repeat": [round(f["step_s"], 4) for f in figures],
            "peak_rss_gb": max(f["peak_rss_gb"] for f in figures),
        }
        for name, figures in seen.items()
    }
    cached_step = results["cached_teacher"]["step_s"]
    return {
        "cache": {
            "top_k": manifest["top_k"],
            "precision": manifest["precision"],
            "valence_k": (manifest["valence"] or {}).get("k"),
            "positions": sum(s["positions"] for s in manifest["splits"].values()),
            "bytes_per_token": round(manifest["bytes_per_token"], 1),
            "write_positions_per_s": round(manifest.get("write_positions_per_s", 0.0), 1),
            "write_wall_s": None if wall is None else round(wall, 1),
        },
        "runs": results,
        "cached_vs_ce_only_step": round(cached_step / results["ce_only"]["step_s"], 3),
        "cached_vs_live_step": round(cached_step / results["live_teacher"]["step_s"], 3),
    }


def _figures(rows: list[dict], args) -> dict:
    return {
        "step_s": median_of(rows, "step_time_s", args.skip),
        "peak_rss_gb": max(float(r["mem_peak_rss_gb"]) for r in rows),
    }


def quality(args) -> dict:
    from vkd_ds.demo import FULL, QUICK, build_assets

    demo = QUICK if args.quick else FULL
    steps = args.steps or demo.distill_steps
    out = work_dir(args.out, "teacher-cache-quality")
    assets = Path(args.assets) if args.assets else out / "assets"
    env = bench_env(args.procs)
    common = [
        "experiment=demo",
        f"assets_dir={assets}",
        "loss.feat=0",  # the cache does not serve feature KD; the live arm leaves it out too
        "gate.enabled=false",  # nor the mercy gate (it continues the probe prompts with the teacher)
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.save_every={steps}",
        "trainer.progress_bar=false",
        "resume=never",
        *args.overrides,
    ]
    arms: dict[str, list[str]] = {"live_teacher": []}
    with contextlib.redirect_stdout(sys.stderr):
        if not args.assets:
            build_assets(assets, demo)
        for k in args.ks:
            cache_dir = out / f"cache_k{k}"
            if not (cache_dir / "manifest.json").is_file():
                cache_teacher(args.procs, [*common, f"cache.top_k={k}"], cache_dir, env)
            arms[f"cached_k{k}"] = cached(cache_dir)
        runs = []
        for arm, extra in arms.items():
            for seed in args.seeds:
                run_dir = out / arm / f"seed{seed}"
                result_file = run_dir / "result.json"
                if not result_file.is_file():
                    train(args.procs, [*common, *extra, f"trainer.seed={seed}"], run_dir, env)
                    final = json.loads((run_dir / "eval.json").read_text())
                    result = {
                        "arm": arm,
                        "seed": seed,
                        "ppl": final["eval/ppl"],
                        "kl_teacher": final["eval/kl_teacher"],
                    }
                    result_file.write_text(json.dumps(result, indent=2) + "\n")
                result = json.loads(result_file.read_text())
                if "kl_teacher_live" not in result:
                    # A cached run's eval/kl_teacher is the bucketed KL (top-k + tail), smaller by
                    # construction: the KL to the whole teacher comes from `vkd-ds eval` with it.
                    result["kl_teacher_live"] = live_kl(run_dir, assets, env) if extra else result["kl_teacher"]
                    result_file.write_text(json.dumps(result, indent=2) + "\n")
                runs.append(result)
    table = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {key: mean_std([r[key] for r in mine]) for key in ("ppl", "kl_teacher", "kl_teacher_live")}
    return {
        **describe(env, args.procs),
        "quick": args.quick,
        "steps": steps,
        "seeds": args.seeds,
        "results": table,
        "runs": runs,
    }


def live_kl(run_dir: Path, assets: Path, env: dict) -> float:
    """KL(teacher ‖ student) at T = 1 of a run's final checkpoint, by `vkd-ds eval` with the live teacher."""
    command = [sys.executable, "-m", "vkd_ds.cli", "eval", str(run_dir), "teacher.cache=null"]
    command.append(f"teacher.path={assets / 'teacher'}")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"eval failed: {run_dir}")
    return json.loads(result.stdout[result.stdout.index("{") :])["eval/kl_teacher"]


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else None
    if what not in ("cost", "quality"):
        raise SystemExit("usage: bench/teacher_cache.py {cost,quality} [options] [overrides ...]")
    del sys.argv[1]  # the rest are the options and hydra overrides of the runs
    parser = run_parser(__doc__, steps=30, skip=5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0], help="cost: loss.temperature")
    parser.add_argument("--repeats", type=int, default=3, help="cost: runs of each kind, interleaved")
    parser.add_argument("--quick", action="store_true", help="quality: the --quick demo's assets and 80 steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--assets", default=None, help="quality: demo assets (default: built under --out)")
    args = parser.parse_args()
    if what == "quality" and "--steps" not in sys.argv:
        args.steps = None  # the demo's
    report = cost(args) if what == "cost" else quality(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
