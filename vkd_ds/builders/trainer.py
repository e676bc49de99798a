"""The trainer over the built parts, restored from the checkpoint's client state when resuming."""

from __future__ import annotations

from vkd_ds.builders.sampling import SamplingPart
from vkd_ds.builders.start import Start
from vkd_ds.builders.teacher import TeacherPart
from vkd_ds.trainer import Trainer


def build_trainer(start: Start, engine, teacher: TeacherPart, sampling: SamplingPart, client_state, log) -> Trainer:
    prepared = start.prepared
    trainer = Trainer(
        start.settings,
        engine,
        teacher.teacher,
        start.objective,
        prepared.tokenizer,
        prepared.train_data,
        prepared.valid_data,
        start.run_dir,
        sampling.gate,
        sampling.seq_kd,
        prepared.packs,
    )
    if client_state is not None:
        trainer.restore(client_state)
        log.info("resumed from %s at step %d", start.resume_from, trainer.step)
    trainer.startup = {"teacher_load": teacher.load.figures if teacher.load is not None else None}
    return trainer
