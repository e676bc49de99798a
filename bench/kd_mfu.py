"""Model-FLOPs utilization of a distillation step (issues #8, #31): CE + soft KD, bf16, one process
(--procs N: N GPUs), random Llama models, vocabulary 32000. Sizes:

    gpu    1.05 B teacher (2048 wide, 18 layers, 16 heads), 117 M student (768 x 12, 12 heads), 8 rows
           of one 1024-token record each, unpacked, micro-batch 8; layout `as-before`: ZeRO-2 student,
           teacher on ZeRO-3 kept on the device (deepspeed=zero2 teacher.offload_param=none). Issue #8's
           configuration: 9.3 % MFU on one H200.
    gpu1b  3.53 B teacher (3072 x 28, 24 heads; 3.63 B with the input embedding), 1.05 B student
           (2048 x 18, 16 heads, intermediate 6144; 1.11 B with it), rows of 4096 tokens packed with
           three documents each (2560 + 1024 + 512 tokens), micro-batch 1 row x grad_accum 8: 32,768
           tokens per step, one row per micro-batch (the only packed batch that FlashAttention-2 keeps
           within documents; about 45 GB of GPU memory estimated, AdamW included); layout `default`:
           what the config's defaults choose (deepspeed=auto).
    tiny   gpu1b's shape at toy size (rows of 128 = 80 + 32 + 16), any machine: its figures mean
           nothing, it checks that the bench runs.

    python bench/kd_mfu.py [--size gpu|gpu1b|tiny] [--layout default|as-before] [--steps 12] [--skip 4]
        [--phases separate|same|off] [--phase-steps 6] [--peak-tflops 989] [--out DIR] [overrides ...]

FLOPs of one step, counted from the shapes (the PaLM appendix-B convention; causal masking not
halved; the input embedding lookup counts nothing, the LM head's matmul counts):

    student: P · (6·N_S + 12·L_S·d_S·A)        teacher: P · (2·N_T + 4·L_T·d_T·A)

N the parameters outside the input embedding, L layers, d width; the student's forward and backward
(6, 12), the teacher's forward only (2, 4). P the positions of the step that are not padding (every
record's tokens, BOS included). A the tokens each position attends over: a document attends only
within itself in a packed row, so a position of a document of length l counts l, and
A = Σ l² / Σ l over a row's documents (1920 for gpu1b's rows; the row length when a row holds one
document, as `gpu`'s). `mfu_full_row_attention` counts A = the row length instead: an upper bound,
what a kernel that ignored the document boundaries would do. MFU = FLOPs per step / median step
time / peak / procs. The peak is the accelerator's dense bf16 rate: 989 TFLOP/s for an H100/H200
SXM (pass --peak-tflops for another).

Student and teacher separately: `trainer.time_phases=true` times each phase of a step, synchronizing
the GPU at every phase boundary (about 5 per micro-batch), which costs some speed. So the MFU comes
from a run without it and the split from a second, shorter run with it (`--phases separate`, the
default; `same`: one run with phase timing, its MFU then slightly low; `off`: no split). Teacher
TFLOP/s = teacher FLOPs / time/teacher_forward; student TFLOP/s = student FLOPs / (time/student_forward
+ time/loss + time/backward + time/optimizer), medians over the measured steps.

A run is stopped (killed) once `--steps` metrics rows exist: the final checkpoint, export and eval
of a 1 B student cost half a minute and nothing here. The report, so far, is also written to
DIR/report.json after each run (a timeout cuts short nothing that was measured). Prints one JSON document.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, asset_overrides, bench_env, describe, run_parser, work_dir  # noqa: E402

from vkd_ds.terms import only_terms  # noqa: E402


@dataclass(frozen=True)
class Size:
    teacher: tuple[int, int, int]  # layers, width, heads (intermediate 3 x width, as vkd_ds.assets writes it)
    student: tuple[int, int, int, int]  # layers, width, heads, intermediate
    vocab: int
    documents: tuple[int, ...]  # the tokens of each document of a row (one: unpacked records)
    micro: int  # rows per micro-batch
    accum: int
    layout: str  # the default --layout
    rows: int = 0  # packed rows in the training data (unpacked: 8 micro-batches of records)

    @property
    def packed(self) -> bool:
        return len(self.documents) > 1

    @property
    def row_tokens(self) -> int:
        return sum(self.documents)


SIZES = {
    "gpu": Size((18, 2048, 16), (12, 768, 12, 2304), 32000, (1024,), 8, 1, "as-before"),
    "gpu1b": Size((28, 3072, 24), (18, 2048, 16, 6144), 32000, (2560, 1024, 512), 1, 8, "default", rows=48),
    "tiny": Size((2, 64, 4), (2, 32, 2, 64), 512, (80, 32, 16), 1, 4, "default", rows=16),
}
# Issue #8's engine layout, which the 9.3 % was measured with; `default` adds nothing (the config's
# defaults decide: `deepspeed=auto` where that is the default).
LAYOUTS = {"as-before": ["deepspeed=zero2", "teacher.offload_param=none"], "default": []}
PHASES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer", "other")
STUDENT_PHASES = ("student_forward", "loss", "backward", "optimizer")
LOGGED = ("vkd-ds:", "layout:", "attention:", "teacher:", "student:", "data: packing", "token losses:")


def non_embedding_params(layers: int, width: int, intermediate: int, vocab: int) -> int:
    """Llama: attention 4·d², SwiGLU MLP 3·d·i, two RMSNorms per layer, the final norm, the LM head."""
    return layers * (4 * width * width + 3 * width * intermediate + 2 * width) + width + vocab * width


def write_teacher(directory: str, tokenizer: str, vocab: int, layers: int, width: int, heads: int, positions: int):
    """A random Llama teacher written in bf16, built on the GPU when there is one (seconds for 3.6 B,
    where a CPU takes minutes and fp32 doubles the bytes written). Run in its own process
    (`build_assets`), so the bench holds no GPU memory while it measures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.assets import llama_config

    torch.manual_seed(0)
    config = llama_config(vocab, width, layers, heads, max_positions=positions)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)


def write_documents(assets: Path, size: Size, seed: int = 0) -> None:
    """`size.rows` rows' worth of documents of exactly `size.documents` tokens (BOS + Zipf words of the
    bench tokenizer): best-fit-decreasing packing fills every row with one of each, so every row is
    full and the attention count exact."""
    from vkd_ds.assets import write_jsonl

    words = [f"w{i}" for i in range(size.vocab - 4)]  # write_bench_assets' vocabulary, after 4 specials
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return " ".join(rng.choices(words, cum_weights=cumulative, k=tokens - 1))

    write_jsonl(assets / "train.jsonl", [text(n) for _ in range(size.rows) for n in size.documents])
    write_jsonl(assets / "valid.jsonl", [text(n) for n in size.documents])


def build_assets(assets: Path, size: Size, procs: int, env: dict) -> float:
    """The size's assets in `assets` unless complete there; the seconds it took."""
    if (assets / "complete").is_file():
        return 0.0
    started = time.time()
    shutil.rmtree(assets, ignore_errors=True)
    from vkd_ds.assets import write_bench_assets

    t_layers, t_width, t_heads = size.teacher
    if not size.packed:  # as issue #8 measured it: an fp32 teacher made on the CPU
        write_bench_assets(
            assets, size.vocab, size.row_tokens, records=8 * size.micro * procs, teacher_layers=t_layers,
            teacher_width=t_width, teacher_heads=t_heads,
        )  # fmt: skip
    else:
        # The tokenizer and valence head of write_bench_assets (a one-layer teacher, replaced below).
        write_bench_assets(assets, size.vocab, size.row_tokens, records=8, teacher_layers=1,
                           teacher_width=t_width, teacher_heads=t_heads)  # fmt: skip
        write_documents(assets, size)
        shutil.rmtree(assets / "teacher")
        spec = {
            "directory": str(assets / "teacher"), "tokenizer": str(assets / "tokenizer"), "vocab": size.vocab,
            "layers": t_layers, "width": t_width, "heads": t_heads, "positions": max(512, size.row_tokens),
        }  # fmt: skip
        bench = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {bench!r}); import kd_mfu; kd_mfu.write_teacher(**{spec!r})"
        # Its output to stderr: stdout is the report's.
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, stdout=sys.stderr)
    (assets / "complete").write_text("")
    return time.time() - started


def complete_rows(path: Path) -> list[dict]:
    """metrics.csv's rows that were written whole (the file may be mid-append)."""
    from vkd_ds.metrics import read_metrics

    if not path.is_file():
        return []
    rows = read_metrics(path)
    return [r for r in rows if r.get("step_time_s") not in (None, "")]


def stop(process: subprocess.Popen) -> None:
    """Kills the launcher and every process under it (by their ids), and waits for them to go."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in reversed(family):  # the workers first, then the launchers
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    process.wait()


def train_steps(procs: int, overrides: list[str], run_dir: Path, env: dict, steps: int) -> dict:
    """A fresh run in `run_dir`, stopped once `steps` metrics rows are written (trainer.max_steps is one
    more, so that the final checkpoint has not begun). Its rows, wall time and what its log says."""
    from vkd_ds.launch import launcher_command

    shutil.rmtree(run_dir, ignore_errors=True)
    command = launcher_command([f"trainer.max_steps={steps + 1}", *overrides, f"run.dir={run_dir}"], procs)
    log_path = run_dir.with_name(run_dir.name + ".log")
    started = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None and len(complete_rows(run_dir / "metrics.csv")) < steps:
                time.sleep(0.5)
        finally:
            stopped = process.poll() is None
            if stopped:
                stop(process)
    rows = complete_rows(run_dir / "metrics.csv")[:steps]
    if len(rows) < steps:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(
            f"benchmark run failed after {len(rows)} of {steps} steps (exit {process.returncode}): {run_dir}"
        )
    text = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    lines = [line.split(" INFO ", 1)[1] for line in text.splitlines() if " INFO " in line]
    # The attention implementations: the start-up log's `attention:` line (before it had one: packed runs
    # named them in their `data: packing` line, unpacked ones nowhere).
    attention = re.search(r" INFO attention: (.+)", text) or re.search(r"within each document: (.+?) \(trans", text)
    startup = run_dir / "startup.json"
    return {
        "rows": rows,
        "wall_s": round(time.time() - started, 1),
        "stopped_early": stopped,
        "time_to_first_step_s": json.loads(startup.read_text()).get("time_to_first_step_s")
        if startup.is_file()
        else None,
        "attention": attention.group(1) if attention else None,
        "log": [line for line in lines if line.startswith(LOGGED)],
    }


def sig(value: float) -> float:
    """Four significant digits (the toy size's figures are tiny, not zero)."""
    return float(f"{value:.4g}")


def median(rows: list[dict], column: str) -> float:
    return statistics.median(float(r[column]) for r in rows)


def peak_gpu_gb(rows: list[dict]) -> float | None:
    return max((float(r["mem_gpu_gb"]) for r in rows if r.get("mem_gpu_gb")), default=None)


def phase_split(rows: list[dict], flops_student: float, flops_teacher: float, peak: float, procs: int) -> dict:
    """Median seconds per phase over `rows` (runs with trainer.time_phases) and the TFLOP/s of each model."""
    seconds = {p: round(median(rows, f"time/{p}"), 4) for p in PHASES if rows[0].get(f"time/{p}") not in (None, "")}
    teacher_s = median(rows, "time/teacher_forward") if "teacher_forward" in seconds else 0.0
    student_s = statistics.median(sum(float(r.get(f"time/{p}") or 0) for p in STUDENT_PHASES) for r in rows)
    split = {"seconds": seconds, "student_s": round(student_s, 4)}
    for name, flops, spent in (("teacher", flops_teacher, teacher_s), ("student", flops_student, student_s)):
        tflops = flops / spent / 1e12 if spent > 0 else None
        split[f"{name}_tflops"] = sig(tflops) if tflops else None
        split[f"{name}_mfu"] = sig(tflops / peak / procs) if tflops else None
    return split


def main() -> int:
    parser = run_parser(__doc__, steps=12, skip=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default=None, help="default: the size's")
    parser.add_argument("--phases", choices=("separate", "same", "off"), default="separate")
    parser.add_argument("--phase-steps", type=int, default=6, help="steps of the phase-timing run (half skipped)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.set_defaults(procs=1)  # one process per GPU; --procs N for N GPUs
    args = parser.parse_args()
    size = SIZES[args.size]
    layout = args.layout or size.layout
    (t_layers, t_width, _), (s_layers, s_width, s_heads, s_inter) = size.teacher, size.student
    out = work_dir(args.out, "mfu")
    out.mkdir(parents=True, exist_ok=True)
    env = bench_env(args.procs)
    assets = out / f"assets_{args.size}"
    assets_s = build_assets(assets, size, args.procs, env)
    packing = ["data.packing=true", f"data.pack_length={size.row_tokens}"] if size.packed else []
    overrides = asset_overrides(assets, size.row_tokens) + [
        *only_terms("ce", "soft"), "weighting.lam=0", "deepspeed.precision=bf16", *LAYOUTS[layout], *packing,
        f"student.config.hidden_size={s_width}", f"student.config.intermediate_size={s_inter}",
        f"student.config.num_hidden_layers={s_layers}", f"student.config.num_attention_heads={s_heads}",
        f"student.config.num_key_value_heads={s_heads}",
        f"student.config.max_position_embeddings={max(2048, size.row_tokens)}",
        f"trainer.micro_batch_size={size.micro}", f"trainer.grad_accum={size.accum}", *args.overrides,
    ]  # fmt: skip

    n_teacher = non_embedding_params(t_layers, t_width, 3 * t_width, size.vocab)
    n_student = non_embedding_params(s_layers, s_width, s_inter, size.vocab)
    attended = sum(n * n for n in size.documents) / size.row_tokens  # A: per document
    report: dict = {
        **describe(env, args.procs),
        "size": args.size,
        "layout": layout,
        "layout_overrides": LAYOUTS[layout],
        "teacher_params_non_embedding": n_teacher,
        "student_params_non_embedding": n_student,
        "teacher_shape": dict(zip(("layers", "width", "heads"), size.teacher, strict=True)),
        "student_shape": dict(zip(("layers", "width", "heads", "intermediate"), size.student, strict=True)),
        "vocab": size.vocab,
        "row_tokens": size.row_tokens,
        "packed": size.packed,
        "documents_per_row": list(size.documents),
        "attended_tokens_per_position": attended,
        "micro_batch_rows": size.micro,
        "grad_accum": size.accum,
        "peak_tflops": args.peak_tflops,
        "assets_s": round(assets_s, 1),
        "overrides": args.overrides,
    }

    def save() -> None:
        (out / "report.json").write_text(json.dumps(report, indent=1))

    def flops_of(rows: list[dict]) -> tuple[int, float, float, float]:
        """(positions, student FLOPs, teacher FLOPs, full-row attention FLOPs) of one step."""
        # metrics.csv's `tokens` are targets: each document's tokens but its first.
        targets_per_row = size.row_tokens - len(size.documents)
        rows_per_step = round(float(rows[-1]["tokens"]) / targets_per_row)
        positions = rows_per_step * size.row_tokens
        per_token = 12 * s_layers * s_width + 4 * t_layers * t_width
        student = positions * (6 * n_student + 12 * s_layers * s_width * attended)
        teacher = positions * (2 * n_teacher + 4 * t_layers * t_width * attended)
        full = positions * (6 * n_student + 2 * n_teacher + per_token * size.row_tokens)
        return positions, student, teacher, full

    phased = ["trainer.time_phases=true"]
    timed = train_steps(args.procs, overrides + (phased if args.phases == "same" else []), out / "run", env, args.steps)
    rows = timed["rows"][args.skip :]
    positions, f_student, f_teacher, f_full = flops_of(timed["rows"])
    step_s = median(rows, "step_time_s")
    flops = f_student + f_teacher
    report.update(
        {
            "steps": args.steps,
            "skip": args.skip,
            "tokens_per_step": positions,
            "rows_per_step": positions // size.row_tokens,
            "fill": float(timed["rows"][-1]["fill"]),
            "median_step_s": round(step_s, 4),
            "tokens_per_s": round(positions / step_s, 1),
            "tflops_per_step": sig(flops / 1e12),
            "student_tflops_per_step": sig(f_student / 1e12),
            "teacher_tflops_per_step": sig(f_teacher / 1e12),
            "achieved_tflops": sig(flops / step_s / 1e12),
            "mfu": sig(flops / step_s / 1e12 / args.peak_tflops / args.procs),
            "mfu_full_row_attention": sig(f_full / step_s / 1e12 / args.peak_tflops / args.procs),
            "peak_gpu_gb": peak_gpu_gb(timed["rows"]),
            "attention": timed["attention"],
            "run": {k: timed[k] for k in ("wall_s", "time_to_first_step_s", "stopped_early", "log")},
            "mfu_from_phase_timed_run": args.phases == "same",
        }
    )
    save()
    if args.phases != "off":
        if args.phases == "same":
            run, measured = timed, rows
        else:
            skip = args.phase_steps // 2
            run = train_steps(args.procs, overrides + phased, out / "run_phases", env, args.phase_steps)
            measured = run["rows"][skip:]
        split = phase_split(measured, f_student, f_teacher, args.peak_tflops, args.procs)
        phase_step_s = median(measured, "step_time_s")
        split.update(
            {
                "run": "the measured run" if args.phases == "same" else f"{args.phase_steps} steps, {skip} skipped",
                "median_step_s": round(phase_step_s, 4),
                # What synchronizing at every phase boundary cost (1.0: nothing).
                "step_time_ratio_to_unsynchronized": None if args.phases == "same" else round(phase_step_s / step_s, 4),
                "peak_gpu_gb": peak_gpu_gb(run["rows"]),
                "wall_s": run["wall_s"],
            }
        )
        report["phases"] = split
        report["teacher_tflops"] = split["teacher_tflops"]
        report["student_tflops"] = split["student_tflops"]
        save()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
