"""Start-up and memory that do not grow with the corpus: the demo's teacher and tokenizer on the demo's
data and on generated JSONL corpora of 200 MB and 1 GB (records of 500-6,000 characters, as the
issue's source files), 2 ranks, data.max_seq_len=512.

For each corpus: `vkd-ds prepare-data` (timed: MB/s, and as a ratio to the tokenizer's own
`encode_batch` over the same texts, that call alone timed), then a short training run on the
prepared store: time to its first step (startup.json) and each rank's peak resident set (VmHWM and
VmRSS of every rank, polled every 50 ms, the largest value seen), median and largest of --repeats
runs. The run on the demo's data is the
reference: the targets are first step within 1.2x of it and each rank's peak within 150 MB of it.
Its rows are short (~107 tokens; the corpora's ~400), and a step's own time and memory grow with
its rows, so 2 MB of the generated corpus is a second reference with rows as long.

    python bench/corpus_scale.py --out DIR [--sizes 200 1000] [--steps 3] [--repeats 3]

Assets are the quick demo's (`vkd-ds demo --quick` builds the same; pretraining the teacher takes a
few minutes on 2 cores), reused from DIR/assets. Results: DIR/results.json and a table on stdout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import REPO, bench_env, describe, run_parser, work_dir

MB = 1e6


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """JSONL of `megabytes` MB: records of 500-6,000 characters drawn from pydoc paragraphs."""
    if path.is_file() and path.stat().st_size >= megabytes * MB:
        return path
    from pydoc_data.topics import topics

    paragraphs = [" ".join(p.split()) for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    staging = path.with_suffix(".partial")
    written = 0
    with staging.open("w") as handle:
        while written < megabytes * MB:
            want, parts, size = rng.randint(500, 6000), [], 0
            while size < want:
                parts.append(rng.choice(paragraphs))
                size += len(parts[-1]) + 1
            line = json.dumps({"text": "\n".join(parts)[:want]}) + "\n"
            handle.write(line)
            written += len(line)
    staging.rename(path)
    return path


def encode_batch_seconds(path: Path, tokenizer_dir: Path) -> float:
    """The tokenizer's own encode_batch over every text of `path`, in the same 4M-character batches
    as the preparation; only the encode_batch calls are timed."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds, batch, chars = 0.0, [], 0

    def encode():
        nonlocal seconds
        started = time.perf_counter()
        backend.encode_batch(batch, add_special_tokens=False)
        seconds += time.perf_counter() - started

    with path.open() as handle:
        for line in handle:
            batch.append(json.loads(line)["text"])
            chars += len(batch[-1])
            if chars >= 1 << 22:
                encode()
                batch, chars = [], 0
    if batch:
        encode()
    return seconds


class PeakPoller:
    """The largest VmHWM / VmRSS seen of every rank under `root` (the deepspeed launcher's children
    that run vkd-ds's entry point), polled until stopped: vkd-ds resets VmHWM after building its engines, so
    the peaks before and after are both seen."""

    def __init__(self, root: int):
        self.root, self.peaks, self.stop = root, {}, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        import psutil

        from vkd_ds.launch import ENTRY_MODULE  # a rank runs `python -m vkd_ds.launch --local_rank=N ...`

        while not self.stop.is_set():
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    # A rank is a child of DeepSpeed's per-node launch process; a short-lived fork of a
                    # rank has the same command line but a rank for a parent, and is left out.
                    line = child.cmdline()
                    if ENTRY_MODULE not in line or "deepspeed.launcher.launch" not in child.parent().cmdline():
                        continue
                    rank = next(a.split("=", 1)[1] for a in line if a.startswith("--local_rank="))
                    with open(f"/proc/{child.pid}/status") as handle:
                        fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmHWM", "VmRSS")))
                    value = max(int(v.split()[0]) * 1024 for v in fields.values())
                    self.peaks[rank] = max(self.peaks.get(rank, 0), value)
                except (OSError, psutil.Error, ValueError, StopIteration, AttributeError):
                    continue
            time.sleep(0.05)

    def finish(self) -> list[float]:
        """Each rank's peak in GB, by local rank."""
        self.stop.set()
        self.thread.join()
        return [self.peaks[rank] / 1e9 for rank in sorted(self.peaks, key=int)]


def prepare(data: Path, assets: Path, stores: Path, env: dict) -> tuple[float, float, str]:
    """`vkd-ds prepare-data` into a fresh store: the command's wall time, the preparation's own rate
    (MB/s, its last progress line: from reading the first input to the last token written, without
    the interpreter's start) and where the store went."""
    cmd = [sys.executable, "-m", "vkd_ds.cli", "prepare-data", f"data.tokenizer_path={assets / 'tokenizer'}"]
    cmd += [f"data.train_path={data}", "data.max_seq_len=512", f"data.store_dir={stores}"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"prepare-data failed:\n{result.stderr[-3000:]}")
    rates = [line.split(" MB/s")[0].rsplit(" ", 1)[1] for line in result.stderr.splitlines() if " MB/s" in line]
    if not rates:
        raise SystemExit(f"prepare-data found {data} prepared already: remove {stores} to time it")
    return time.perf_counter() - started, float(rates[-1]), result.stdout.strip()


def train(data: Path, assets: Path, stores: Path, run_dir: Path, steps: int, procs: int, env: dict, extra) -> dict:
    from vkd_ds.launch import launcher_command

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ["experiment=demo", f"assets_dir={assets}", f"data.train_path={data}", "data.valid_path=null"]
    overrides += ["data.max_seq_len=512", f"data.store_dir={stores}", f"trainer.max_steps={steps}"]
    overrides += ["trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false", "resume=never"]
    overrides += [f"run.dir={run_dir}", *extra]
    job = subprocess.Popen(
        launcher_command(overrides, procs), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    poller = PeakPoller(job.pid)
    _, err = job.communicate()
    peaks = poller.finish()
    if job.returncode != 0:
        raise SystemExit(f"training failed:\n{err[-3000:]}")
    startup = json.loads((run_dir / "startup.json").read_text())
    summary = next((line for line in err.splitlines() if "data: train:" in line), "")
    return {"time_to_first_step_s": startup["time_to_first_step_s"], "rank_peak_rss_gb": peaks, "log": summary}


def main() -> None:
    parser = run_parser(__doc__, steps=3, skip=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000], help="corpus sizes in MB")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per corpus (median first step)")
    args = parser.parse_args()
    out = work_dir(args.out, "corpus")
    out.mkdir(parents=True, exist_ok=True)
    env = bench_env(args.procs)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    sys.path.insert(0, str(REPO))
    from vkd_ds.demo import QUICK, build_assets

    assets = out / "assets"
    build_assets(assets, QUICK)
    stores = out / "stores"
    shutil.rmtree(stores, ignore_errors=True)  # every preparation timed from scratch
    # References: the demo's data (rows of ~107 tokens), and 2 MB of the generated corpus (a prefix
    # of the larger ones: rows as long, so what differs is the corpus's size alone).
    corpora = {"demo": assets / "train.jsonl", "2 MB": write_corpus(out / "corpus_2mb.jsonl", 2)}
    for size in args.sizes:
        corpora[f"{size} MB"] = write_corpus(out / f"corpus_{size}mb.jsonl", size)
    results = {"setup": describe(env, args.procs), "runs": {}}
    for name, data in corpora.items():
        megabytes = data.stat().st_size / MB
        seconds, rate, printed = prepare(data, assets, stores, env)
        baseline = encode_batch_seconds(data, assets / "tokenizer")
        run_dir = out / f"run_{name.replace(' ', '')}"
        runs = [train(data, assets, stores, run_dir, args.steps, args.procs, env, args.overrides)]
        runs += [
            train(data, assets, stores, run_dir, args.steps, args.procs, env, args.overrides)
            for _ in range(args.repeats - 1)
        ]
        run = {
            "time_to_first_step_s": statistics.median(r["time_to_first_step_s"] for r in runs),
            "time_to_first_step_each_s": [r["time_to_first_step_s"] for r in runs],
            # Rank by rank, the largest of the repeats.
            "rank_peak_rss_gb": [max(p) for p in zip(*(r["rank_peak_rss_gb"] for r in runs), strict=True)],
            "log": runs[0]["log"],
        }
        results["runs"][name] = {
            "megabytes": megabytes,
            "prepare_command_s": seconds,
            "prepare_mb_per_s": rate,
            "encode_batch_s": baseline,
            "encode_batch_mb_per_s": megabytes / baseline,
            "prepare_vs_encode_batch": rate / (megabytes / baseline),
            "store": printed,
            **run,
        }
        print(json.dumps({name: results["runs"][name]}, indent=1), flush=True)
    header = f"{'data':>8} {'MB':>8} {'prepare s':>10} {'MB/s':>6} {'/encode_batch':>14} {'first step s':>13}"
    print(f"\n{header} {'x demo':>7} {'x 2 MB':>7} {'rank peaks GB':>14} {'vs demo MB':>11} {'vs 2 MB MB':>11}")
    for name, r in results["runs"].items():
        cells = []
        for ref_name in ("demo", "2 MB"):
            ref = results["runs"][ref_name]
            pairs = zip(r["rank_peak_rss_gb"], ref["rank_peak_rss_gb"], strict=False)
            cells.append((r["time_to_first_step_s"] / ref["time_to_first_step_s"], max(a - b for a, b in pairs) * 1e3))
        print(
            f"{name:>8} {r['megabytes']:>8.1f} {r['prepare_command_s']:>10.1f} {r['prepare_mb_per_s']:>6.1f} "
            f"{r['prepare_vs_encode_batch']:>14.2f} {r['time_to_first_step_s']:>13.1f} "
            f"{cells[0][0]:>7.2f} {cells[1][0]:>7.2f} {', '.join(f'{p:.2f}' for p in r['rank_peak_rss_gb']):>14} "
            f"{cells[0][1]:>+11.0f} {cells[1][1]:>+11.0f}"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
