"""`vkd-ds demo`: the embedded default job, offline from start to finish.

1. assets: English text from `pydoc_data`, a BPE tokenizer, a teacher pretrained here
   (single process), and the teacher's valence head fitted on VADER lexicon labels
   (`fit-valence-head`);
2. distillation of a 2-layer student with 2 processes on ZeRO-3 (`vkd-ds train`), every
   term of the objective on but sequence KD (`vkd-ds demo loss.seq=0.01` adds it), valence-weighted sequences;
3. the same student trained with cross-entropy only, same steps and data;
4. a summary: held-out perplexity of teacher, distilled student, CE-only student.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.terms import only_terms


@dataclass(frozen=True)
class DemoSettings:
    vocab_size: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    teacher_batch: int
    seq_len: int
    distill_steps: int
    valence_head_steps: int


FULL = DemoSettings(
    vocab_size=2048,
    teacher_hidden=192,
    teacher_layers=4,
    teacher_steps=600,
    teacher_batch=16,
    seq_len=128,
    distill_steps=300,
    valence_head_steps=100,
)
QUICK = replace(FULL, teacher_steps=150, distill_steps=80, valence_head_steps=40)
HEAD_FILE = "teacher_valence_head.safetensors"
ASSETS_MARKER = "ASSETS_COMPLETE.json"


def say(message: str) -> None:
    print(message, flush=True)


def build_assets(assets: Path, settings: DemoSettings) -> None:
    """Tokenizer, teacher, train.jsonl, valid.jsonl; reused when already built with the same settings."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from vkd_ds.assets import llama_config, pretrain_lm, pydoc_records, split_records, train_tokenizer, write_jsonl

    marker = assets / ASSETS_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == asdict(settings):
        say(f"[1/4] assets: reusing {assets}")
        return
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir(parents=True)
    started = time.time()
    train_texts, valid_texts = split_records(pydoc_records())
    write_jsonl(assets / "train.jsonl", train_texts)
    write_jsonl(assets / "valid.jsonl", valid_texts)
    tokenizer = train_tokenizer(train_texts, settings.vocab_size, assets / "tokenizer")
    say(
        f"[1/4] assets: {len(train_texts)} train / {len(valid_texts)} valid records from pydoc_data, "
        f"BPE tokenizer of {len(tokenizer)} tokens"
    )
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = AutoModelForCausalLM.from_config(
        llama_config(len(tokenizer), settings.teacher_hidden, settings.teacher_layers, max_positions=512)
    )
    n_params = sum(p.numel() for p in teacher.parameters())
    say(f"      pretraining the teacher ({n_params / 1e6:.1f}M parameters, {settings.teacher_steps} steps)")
    pretrain_lm(
        teacher,
        tokenizer,
        train_texts,
        steps=settings.teacher_steps,
        batch_size=settings.teacher_batch,
        seq_len=settings.seq_len,
        lr=6e-3,
        seed=0,
        log=say,
    )
    hf_logging.disable_progress_bar()
    teacher.save_pretrained(assets / "teacher")
    tokenizer.save_pretrained(assets / "teacher")
    say(f"      fitting the teacher's valence head on VADER lexicon labels ({settings.valence_head_steps} steps)")
    fit_demo_valence_head(assets, settings)
    marker.write_text(json.dumps(asdict(settings)))
    say(f"      assets ready in {time.time() - started:.0f}s")


def fit_demo_valence_head(assets: Path, settings: DemoSettings) -> dict:
    from vkd_ds.config import compose
    from vkd_ds.fit_head import fit_valence_head

    cfg = compose(
        [
            "experiment=demo",
            f"assets_dir={assets}",
            f"valence.fit.out={assets / HEAD_FILE}",
            "valence.fit.labels=lexicon",
            f"valence.fit.steps={settings.valence_head_steps}",
            f"data.max_seq_len={settings.seq_len}",
        ]
    )
    return fit_valence_head(cfg, log=lambda line: say("      " + line.strip()))


def _rows(run_dir: Path) -> list[dict]:
    from vkd_ds.metrics import read_metrics

    return read_metrics(run_dir / "metrics.csv")


def _mean_column(run_dir: Path, column: str) -> float:
    values = [float(row[column]) for row in _rows(run_dir) if row.get(column)]
    return sum(values) / len(values)


def _seq_summary(run_dir: Path) -> dict:
    """With sequence KD on: the teacher's mean log-prob of the student's samples, first and last 10 rollouts."""
    values = [float(row["seq/teacher_logprob"]) for row in _rows(run_dir) if row.get("seq/teacher_logprob")]
    if not values:
        return {}
    n = min(10, len(values))
    return {"seq_teacher_logprob_first": sum(values[:n]) / n, "seq_teacher_logprob_last": sum(values[-n:]) / n}


def _gate_summary(run_dir: Path) -> dict:
    """When the mercy gate ran: the step it armed at (None: never) and the steps it rejected."""
    from vkd_ds.report import armed_step

    rows = _rows(run_dir)
    if "gate/armed" not in rows[-1]:
        return {}
    return {"gate_armed_at": armed_step(rows), "gate_rejected": int(rows[-1]["gate/rejected"])}


def _train(overrides: list[str], label: str) -> dict:
    from vkd_ds.launch import start_training

    started = time.time()
    code = start_training(overrides)
    if code != 0:
        raise VkdError(f"demo: the {label} run failed (exit {code}); see the messages above")
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")))
    result = json.loads((run_dir / "eval.json").read_text())
    result["seconds"] = time.time() - started
    return result


def run_demo(out: str | Path, quick: bool = False, overrides: list[str] | None = None) -> dict:
    """`overrides` (hydra) apply to the distillation run only; the CE-only baseline stays CE only."""
    settings = QUICK if quick else FULL
    out = Path(out).resolve()
    assets = out / "assets"
    started = time.time()
    build_assets(assets, settings)
    common = [
        "experiment=demo",
        f"assets_dir={assets}",
        f"trainer.max_steps={settings.distill_steps}",
        f"data.max_seq_len={settings.seq_len}",
        "resume=never",
        "trainer.progress_bar=false",
        f"trainer.log_every={max(settings.distill_steps // 10, 1)}",
    ]
    kd_dir, ce_dir = out / "run", out / "run_ce_only"
    for run_dir in (kd_dir, ce_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    say(f"[2/4] distilling the student: 2 processes, ZeRO-3, {settings.distill_steps} steps -> {kd_dir}")
    kd = _train(common + [f"run.dir={kd_dir}", *(overrides or [])], "distillation")
    say(f"[3/4] the same student with cross-entropy only -> {ce_dir}")
    # CE only: no valence head on the student, so no mercy gate either.
    ce_only = [*only_terms("ce"), "weighting.lam=0", "gate.enabled=false"]
    ce = _train(common + [f"run.dir={ce_dir}", *ce_only], "CE-only")
    summary = {
        "teacher_ppl": kd["eval/teacher_ppl"],
        "distilled_student_ppl": kd["eval/ppl"],
        "ce_only_student_ppl": ce["eval/ppl"],
        "distilled_kl_to_teacher": kd["eval/kl_teacher"],
        "distilled_valence_mse": kd.get("eval/valence_mse"),
        "mean_ess": _mean_column(kd_dir, "ess"),
        "min_ess": min(float(r["ess"]) for r in _rows(kd_dir)),
        **_seq_summary(kd_dir),
        **_gate_summary(kd_dir),
        "steps": settings.distill_steps,
        "quick": quick,
        "seconds": time.time() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from vkd_ds.report import write_report

    report = write_report(kd_dir)
    verdict = "beats" if summary["distilled_student_ppl"] < summary["ce_only_student_ppl"] else "does NOT beat"
    say("[4/4] held-out perplexity (valid.jsonl, lower is better)")
    say(f"      teacher                      {summary['teacher_ppl']:9.2f}")
    say(f"      student, distilled (KD)      {summary['distilled_student_ppl']:9.2f}")
    say(f"      student, CE only             {summary['ce_only_student_ppl']:9.2f}")
    say(
        f"      valence weighting: effective sample size {summary['mean_ess']:.2f} of the global batch "
        f"on average (lowest {summary['min_ess']:.2f}; metrics.csv column `ess`)"
    )
    if "gate_rejected" in summary:
        armed = summary["gate_armed_at"]
        when = f"armed at step {armed}" if armed is not None else "never armed"
        say(
            f"      mercy gate: {when}, rejected {summary['gate_rejected']} of {settings.distill_steps} steps "
            "(metrics.csv columns `gate/*`, the report's gate plots)"
        )
    if "seq_teacher_logprob_first" in summary:
        say(
            "      sequence KD: the teacher's log-prob of the student's samples went from "
            f"{summary['seq_teacher_logprob_first']:.2f} to {summary['seq_teacher_logprob_last']:.2f} "
            "nats per token (first and last 10 rollouts; metrics.csv column `seq/teacher_logprob`)"
        )
    say(
        f"      the distilled student {verdict} the CE-only student "
        f"({summary['seconds']:.0f}s in all; summary in {out / 'summary.json'})"
    )
    say(f"      report with plots of the distillation run: {report}")
    sys.stdout.flush()
    return summary
