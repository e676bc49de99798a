"""Start-up and memory that do not grow with the corpus: the demo's teacher and tokenizer on the demo's
data and on generated JSONL corpora of 200 MB and 1 GB (records of 500-6,000 characters, as the
issue's source files), 2 ranks, data.max_seq_len=512.

For each corpus: `vkd-ds prepare-data` (timed: MB/s, and as a ratio to the tokenizer's own
`encode_batch` over the same texts, that call alone timed), then a short training run on the
prepared store: time to its first step (startup.json) and each rank's peak resident set (VmHWM and
VmRSS of every rank, polled every 50 ms, the largest value seen). The run on the demo's data is the
reference: the targets are first step within 1.2x of it and each rank's peak within 150 MB of it.

    python bench/corpus_scale.py --out DIR [--sizes 200 1000] [--steps 3]

Assets are the quick demo's (`vkd-ds demo --quick` builds the same; pretraining the teacher takes a
few minutes on 2 cores), reused from DIR/assets. Results: DIR/results.json and a table on stdout.
"""

from __future__ import annotations

import json
import os
import random
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
    """The largest VmHWM / VmRSS seen of every process under `root` whose command line has
    --local_rank (a rank), polled until stopped: vkd-ds resets VmHWM after building its engines, so
    the peaks before and after are both seen."""

    def __init__(self, root: int):
        self.root, self.peaks, self.stop = root, {}, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        import psutil

        while not self.stop.is_set():
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if not any(a.startswith("--local_rank") for a in child.cmdline()):
                        continue
                    with open(f"/proc/{child.pid}/status") as handle:
                        fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmHWM", "VmRSS")))
                    value = max(int(v.split()[0]) * 1024 for v in fields.values())
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), value)
                except (OSError, psutil.Error, ValueError):
                    continue
            time.sleep(0.05)

    def finish(self) -> list[float]:
        self.stop.set()
        self.thread.join()
        return sorted((v / 1e9 for v in self.peaks.values()), reverse=True)


def prepare(data: Path, assets: Path, stores: Path, env: dict) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "vkd_ds.cli", "prepare-data", f"data.tokenizer_path={assets / 'tokenizer'}"]
    cmd += [f"data.train_path={data}", "data.max_seq_len=512", f"data.store_dir={stores}"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"prepare-data failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout.strip()


def train(data: Path, assets: Path, stores: Path, run_dir: Path, steps: int, procs: int, env: dict, extra) -> dict:
    import shutil

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
    corpora = {"demo": assets / "train.jsonl"}
    for size in args.sizes:
        corpora[f"{size} MB"] = write_corpus(out / f"corpus_{size}mb.jsonl", size)
    results = {"setup": describe(env, args.procs), "runs": {}}
    for name, data in corpora.items():
        megabytes = data.stat().st_size / MB
        seconds, printed = prepare(data, assets, stores, env)
        baseline = encode_batch_seconds(data, assets / "tokenizer")
        run = train(
            data, assets, stores, out / f"run_{name.replace(' ', '')}", args.steps, args.procs, env, args.overrides
        )
        results["runs"][name] = {
            "megabytes": megabytes,
            "prepare_s": seconds,
            "prepare_mb_per_s": megabytes / seconds,
            "encode_batch_s": baseline,
            "prepare_vs_encode_batch": baseline / seconds,
            "store": printed,
            **run,
        }
        print(json.dumps({name: results["runs"][name]}, indent=1), flush=True)
    ref = results["runs"]["demo"]
    print(
        f"\n{'data':>8} {'MB':>8} {'prepare s':>10} {'MB/s':>6} {'vs encode_batch':>16} {'first step s':>13} "
        f"{'x demo':>7} {'rank peaks GB':>16} {'vs demo MB':>11}"
    )
    for name, r in results["runs"].items():
        extra_mb = max(a - b for a, b in zip(r["rank_peak_rss_gb"], ref["rank_peak_rss_gb"], strict=False)) * 1e3
        print(
            f"{name:>8} {r['megabytes']:>8.1f} {r['prepare_s']:>10.1f} {r['prepare_mb_per_s']:>6.1f} "
            f"{r['prepare_vs_encode_batch']:>16.2f} {r['time_to_first_step_s']:>13.1f} "
            f"{r['time_to_first_step_s'] / ref['time_to_first_step_s']:>7.2f} "
            f"{', '.join(f'{p:.2f}' for p in r['rank_peak_rss_gb']):>16} {extra_mb:>+11.0f}"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
