"""The student: its module (LM, projectors, valence head, regularized parameters) in its DeepSpeed
engine, ready to load the checkpoint resumed from, its packed-row attention checked."""

from __future__ import annotations

from vkd_ds import checkpoint, dist, engines
from vkd_ds.builders.inputs import Prepared
from vkd_ds.builders.start import Start
from vkd_ds.ds_config import student_lr_schedule
from vkd_ds.errors import VkdError
from vkd_ds.objective import Teacher
from vkd_ds.packing import leaks_across_documents
from vkd_ds.settings import Settings

# A packed document's logits against the same document alone: fp32 agrees to ~1e-6, bf16 to ~1e-2; a
# document that sees another moves by a sizeable share of its logits.
PACKED_ATTENTION_TOLERANCE = 0.05


def build_student(s: Settings, prepared: Prepared, ds_config: dict, seed: int):
    """The student module of this config: LM, projectors, valence head, regularized parameters."""
    objective = prepared.objective
    return engines.build_student_model(
        s.student.path,
        prepared.student_config,
        ds_config,
        seed,
        eager_attention=objective.attention > 0,
        feat_layers=objective.student_layers,
        teacher_width=prepared.teacher_width,
        projectors=bool(s.feat.projectors),
        valence_k=objective.valence_k,
        reg_patterns=list(s.reg.param_patterns),
        fused_head=objective.fused_head,
    )


def build_student_engine(start: Start, teacher: Teacher | None):
    """Collective. `teacher`: the live teacher, whose packed-row attention is checked too."""
    s, prepared, meta = start.settings, start.prepared, start.meta
    ds_config = start.ds_config
    if meta is not None and checkpoint.needs_universal(
        start.resume_from,
        meta,
        start.world,
        int(ds_config["zero_optimization"]["stage"]),  # deepspeed.extra may override deepspeed.zero_stage
        None if s.eval_only else start.global_batch,
        nvme_optimizer=ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "nvme",
    ):
        # Written by another number of ranks: DeepSpeed re-partitions a universal checkpoint.
        checkpoint.make_universal(start.resume_from)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    student = build_student(s, prepared, ds_config, s.trainer.seed)
    engine, _, _ = engines.build_student_engine(student, ds_config, student_lr_schedule(s, ds_config))
    if prepared.packs is not None and not s.eval_only:
        _check_packed_attention(engine, teacher, prepared)
    return engine


def log_student(log, start: Start, engine, teacher: Teacher | None) -> None:
    s = start.settings
    parts = [f"{engine.module.lm.config._attn_implementation} (student)"]
    if teacher is not None:
        parts.append(f"{teacher.engine.module.config._attn_implementation} (teacher)")
    log.info("attention: %s", ", ".join(parts))
    local, total = engines.local_param_count(engine)
    log.info(
        "student: %.2fM parameters, %.2fM held by rank 0 (%s)",
        total / 1e6,
        local / 1e6,
        s.student.path or f"new {start.prepared.student_config.model_type} from student.config",
    )


def _check_packed_attention(engine, teacher: Teacher | None, prepared: Prepared) -> None:
    """Refuses packing for a model whose attention lets one packed document see another: transformers
    derives block-diagonal masks from restarting positions for most architectures, not for all.
    Collective (ZeRO-3 forwards): every rank runs it."""
    vocab = len(prepared.tokenizer)
    engine.eval()  # no dropout in the comparison
    try:
        leak = leaks_across_documents(lambda b: engine(**b)["logits"], vocab, dist.device())
        who = "the student"
        if teacher is not None and leak <= PACKED_ATTENTION_TOLERANCE:
            leak = leaks_across_documents(lambda b: teacher(**b)["logits"], vocab, dist.device())
            who = "the teacher"
    finally:
        engine.train()
    if leak > PACKED_ATTENTION_TOLERANCE:
        raise VkdError(
            f"data.packing: {who}'s attention lets one packed document see another (its logits moved by "
            f"{leak:.2g} of their size with another document before it): transformers does not derive "
            "per-document masks for this model or attention implementation (flash attention: only in a "
            "batch of one row); set data.packing=false, or another attention implementation"
        )
