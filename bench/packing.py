"""Packed rows against one record per row: how full the rows are and real (non-padding) tokens per
second, on the demo's corpus and on short records with a wide spread of lengths (2 to 40 words, cut
from the demo's text by vkd_ds.assets.write_short_records), with the demo's settings (experiment=demo:
data.max_seq_len=128, 2 ranks, ZeRO-3, every term the demo runs).

For each corpus, three layouts alternate --repeats times: unpacked (data.packing=false, 8 rows per
micro-batch), packed (8 rows of data.max_seq_len) and packed into rows twice as long with half the
micro-batch (the same row positions per micro-batch: data.pack_length=256 trainer.micro_batch_size=4,
the demo's own setting); each run's
figure is the median over its steps after --skip of `real_tokens_per_s` (the non-padding tokens of
the step's rows over the step's time) and `fill` (their share of the row positions). The ratio
packed/unpacked compares runs of the same invocation, on the same machine, one at a time.
Targets (issue 29): rows >= 95 % full on the demo's corpus, and >= 1.25x (demo) and 1.5x (short
records) the unpacked run's real tokens per second. Whole documents of the demo's corpus cannot fill
rows of 128 to 95 %: 928 of its 1,269 rows are longer than 64 tokens, so no two of them share a row,
and 928 rows hold at most 92.6 % of their positions' worth of its tokens; rows of 256 can.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/packing.py --out DIR [--steps 30] [--repeats 2]

Assets are the quick demo's (`vkd-ds demo --quick` builds the same), reused from DIR/assets.
Results: DIR/results.json and a table on stdout.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from common import REPO, bench_env, describe, median_of, run_parser, train, work_dir

LAYOUTS = {
    "unpacked": ["data.packing=false", "data.pack_length=null", "trainer.micro_batch_size=8"],
    "packed": ["data.packing=true", "data.pack_length=null", "trainer.micro_batch_size=8"],
    # The demo's own setting (configs/experiment/demo.yaml).
    "packed, rows of 256": ["data.packing=true", "data.pack_length=256", "trainer.micro_batch_size=4"],
}


def packing_summary(run_dir: Path) -> str:
    """The start-up log's packing line ('' when the run did not pack)."""
    for line in (run_dir / "train.log").read_text().splitlines():
        if "data: packing:" in line:
            return line.split("data: ", 1)[1]
    return ""


def main() -> None:
    parser = run_parser(__doc__, steps=30, skip=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--short-records", type=int, default=4000)
    args = parser.parse_args()
    out = work_dir(args.out, "packing").resolve()
    from vkd_ds.assets import write_short_records
    from vkd_ds.demo import QUICK, build_assets

    assets = out / "assets"
    build_assets(assets, QUICK)
    short = out / "short_records.jsonl"
    if not short.is_file():
        write_short_records(short, assets / "train.jsonl", args.short_records)
    env = bench_env(args.procs)
    env["VKD_DS_DATA_CACHE"] = str(out / "stores")
    corpora = {"demo": assets / "train.jsonl", "short records": short}
    results = {"setup": describe(env, args.procs), "steps": args.steps, "skip": args.skip, "corpora": {}}
    for name, data in corpora.items():
        figures = {layout: [] for layout in LAYOUTS}
        fills = {layout: [] for layout in LAYOUTS}
        summaries = {}
        for repeat in range(args.repeats):
            for layout, settings in LAYOUTS.items():
                run_dir = out / "runs" / "_".join([*f"{name} {layout}".replace(",", "").split(), str(repeat)])
                overrides = [
                    "experiment=demo",
                    f"assets_dir={assets}",
                    f"data.train_path={data}",
                    *settings,
                    f"trainer.max_steps={args.steps}",
                    "trainer.eval_every=0",
                    "trainer.save_every=0",
                    "trainer.progress_bar=false",
                    "resume=never",
                    *args.overrides,
                ]
                rows = train(args.procs, overrides, run_dir, env)
                figures[layout].append(median_of(rows, "real_tokens_per_s", args.skip))
                fills[layout].append(median_of(rows, "fill", args.skip))
                summaries[layout] = packing_summary(run_dir)
                print(f"{name} {layout} run {repeat + 1}: {figures[layout][-1]:.0f} real tokens/s", flush=True)
        unpacked = statistics.median(figures["unpacked"])
        results["corpora"][name] = {
            "data": str(data),
            "layouts": {
                layout: {
                    "overrides": LAYOUTS[layout],
                    "real_tokens_per_s": figures[layout],
                    "fill": statistics.median(fills[layout]),
                    "speedup": statistics.median(figures[layout]) / unpacked,
                    "packing": summaries[layout],
                }
                for layout in LAYOUTS
            },
        }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'corpus':<15} {'layout':<22} {'fill':>6} {'real tok/s':>10} ratio")
    for name, r in results["corpora"].items():
        for layout, f in r["layouts"].items():
            tps = statistics.median(f["real_tokens_per_s"])
            print(f"{name:<15} {layout:<22} {f['fill']:>6.1%} {tps:>10.0f} {f['speedup']:.2f}x")
            if f["packing"]:
                print(f"  {f['packing'].split(';')[0]}")
    print(f"results: {out / 'results.json'} (repo {REPO.name})", file=sys.stderr)


if __name__ == "__main__":
    main()
