"""`train(cfg)`: the whole distillation job, from a composed config, as a sequence of builders
(vkd_ds/builders/): inputs, start (resume point, layout, DeepSpeed configs), teacher, student,
sampling (sequence KD, on-policy steps, the mercy gate), trainer.

Order matters for "nothing half-written": every check (config, paths, tokenizer, vocabularies, data,
DeepSpeed's configs, the checkpoint resumed from) runs and both engines exist before the run directory
is touched; only then is the log opened and each builder's start-up lines written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from vkd_ds import checkpoint, dist
from vkd_ds.builders.inputs import Prepared, prepare
from vkd_ds.builders.sampling import build_sampling
from vkd_ds.builders.start import plan_start
from vkd_ds.builders.student import build_student_engine, log_student
from vkd_ds.builders.teacher import build_teacher, return_memory_until_the_teacher_is_loaded
from vkd_ds.builders.trainer import build_trainer
from vkd_ds.config import to_yaml
from vkd_ds.errors import VkdError
from vkd_ds.memory import reset_peak_rss
from vkd_ds.metrics import setup_logging
from vkd_ds.settings import Settings
from vkd_ds.step_guard import GuardStop


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs the job on the process group the launcher started (or a group of one)."""
    prepared = prepare(cfg)
    dist.init()
    tune_allocator = return_memory_until_the_teacher_is_loaded(prepared.settings)
    start = plan_start(prepared)
    s, run_dir = start.settings, start.run_dir
    teacher = build_teacher(start, tune_allocator)
    engine = build_student_engine(start, teacher.live)
    sampling = build_sampling(start, engine, teacher.teacher)
    # The checkpoint is read before anything is written: a damaged one leaves the run directory as it was.
    client_state = None
    if start.meta is not None:
        client_state = checkpoint.load(engine, start.resume_from, start.meta, int(s.trainer.seed))
    if s.eval_only:
        return _evaluate_only(s, engine, teacher.teacher, start.prepared, run_dir, start.resume_from, client_state)
    # All checks passed and both engines exist: only now is the run directory written.
    if dist.is_main():
        _write_run_files(s, run_dir, start.prepared)
    dist.barrier()
    log = setup_logging(run_dir, dist.is_main())
    start.log_startup(log)
    teacher.log_startup(log, start)
    log_student(log, start, engine, teacher.live)
    sampling.log_startup(log, start)
    trainer = build_trainer(start, engine, teacher, sampling, client_state, log)
    # From here a step's `mem_peak_rss_gb` is training's own peak; loading's is in startup.json.
    reset_peak_rss()
    if start.changed_since_stop is not None:
        stop_step, changed = start.changed_since_stop
        log.info(
            "the run ended at step %d by gate.max_consecutive_rejections (%s); going on with changed %s",
            stop_step,
            checkpoint.STOPPED,
            ", ".join(changed),
        )
    try:
        result = trainer.fit()
    except GuardStop as stop:
        # Every rank stops at this step: the others wait for the record, so that the launcher does
        # not kill rank 0 (a rank exited non-zero) while it writes it.
        try:
            if dist.is_main():
                checkpoint.write_stop(run_dir, stop.record(), s.resolved)
        finally:
            dist.barrier()
        raise
    if trainer.step >= s.trainer.max_steps:  # not after a preemption or trainer.stop_after_steps
        log.info("done: step %d %s", trainer.step, " ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result


def _write_run_files(s: Settings, run_dir: Path, prepared: Prepared) -> None:
    """Rank 0: the resolved config, and what export needs (student config, tokenizer)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(s.resolved))
    student_dir = run_dir / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    prepared.student_config.save_pretrained(student_dir)
    prepared.tokenizer.save_pretrained(student_dir)


def _evaluate_only(s: Settings, engine, teacher, prepared: Prepared, run_dir: Path, resume_from, client_state) -> dict:
    """`vkd-ds eval`: the held-out evaluation of a run's checkpoint (or of student.path), nothing trained.
    Writes RUN_DIR/eval/step_XXXXXXX.json for a checkpoint and prints the figures."""
    import json
    import os

    from vkd_ds.evaluation import evaluate

    log = setup_logging(None, dist.is_main())
    if resume_from is None and s.student.path is None:
        raise VkdError(f"eval: {run_dir} holds no complete checkpoint and student.path is not set: nothing to evaluate")
    if not prepared.valid_data:
        raise VkdError("eval: data.valid_path is not set: nothing to evaluate on")
    step, source = 0, str(s.student.path)
    if client_state is not None:
        step, source = int(client_state["step"]), str(resume_from)
    figures = evaluate(
        engine,
        teacher,
        prepared.objective,
        prepared.valid_data,
        prepared.tokenizer.pad_token_id,
        int(s.trainer.micro_batch_size),
        s.trainer.eval_max_batches,
    )
    result = {"step": step, "source": source, **figures}
    if dist.is_main():
        if resume_from is not None:
            out = run_dir / "eval" / f"{checkpoint.tag_of(step)}.json"
            out.parent.mkdir(exist_ok=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, out)
            log.info("wrote %s", out)
        print(json.dumps(result, indent=2), flush=True)
    return result
