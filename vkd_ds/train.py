"""`train(cfg)`: the whole distillation job, from a composed config.

Order matters for "nothing half-written": every check (config, paths,
tokenizer, vocabularies, data) runs before the run directory is touched.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from vkd_ds import checkpoint, dist
from vkd_ds.build import build_objective
from vkd_ds.config import check_global_batch, to_yaml
from vkd_ds.errors import VkdError
from vkd_ds.features import hidden_width, num_layers, resolve_layer_map
from vkd_ds.layout import Layout, plan_layout, with_layout
from vkd_ds.memory import GIB, free_device_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from vkd_ds.metrics import setup_logging
from vkd_ds.models import (
    check_buildable,
    check_same_tokenizer,
    check_vocab,
    load_model_config,
    load_tokenizer,
    model_config_from_dict,
    student_config_from_dict,
)
from vkd_ds.objective import Objective, Teacher
from vkd_ds.packing import PackedRows, leaks_across_documents, packed_rows
from vkd_ds.settings import Settings
from vkd_ds.token_store import TokenRows, open_splits
from vkd_ds.valence import load_head


@dataclass
class Prepared:
    tokenizer: object
    student_config: object
    train_data: TokenRows
    valid_data: TokenRows | list  # [] without data.valid_path
    objective: Objective
    teacher_width: int
    data_notes: list[str]  # skipped, cut and prompt-only records: logged at start
    settings: Settings
    data_splits: dict | None = None  # open_splits' {split: (config value, rows)}: what a teacher cache holds
    cache_manifest: dict | None = None  # teacher.cache's, checked against this run
    teacher_parameters: int | None = None  # teacher.path's, its checkpoint checked against its config
    packs: PackedRows | None = None  # the training rows packed (data.packing), None unpacked

    @property
    def loads_teacher(self) -> bool:
        """Whether the ranks load teacher.path: a term needs its outputs, or the gate its valence
        baseline; never with teacher.cache (the settings refused every term that needs it live)."""
        s = self.settings
        return not s.teacher.cache and (self.objective.needs_teacher or s.gate.enabled)


def prepare(cfg: DictConfig) -> Prepared:
    """Every input check, with no side effects (no process group needed); the settings of the run."""
    s = Settings.from_config(cfg)
    if s.teacher.path is not None:
        teacher_config = load_model_config(s.teacher.path, "teacher.path")
    else:  # teacher.cache without the teacher: its config comes from the cache's manifest
        from vkd_ds.teacher_cache import read_manifest

        teacher_config = model_config_from_dict(read_manifest(s.teacher.cache)["teacher"]["config"], "teacher.cache")
    tokenizer = load_tokenizer(s.data.tokenizer_path)
    vocab = len(tokenizer)
    check_vocab(vocab, teacher_config.vocab_size, f"teacher ({s.teacher.path})")
    if s.student.path is not None:
        student_config = load_model_config(s.student.path, "student.path")
        check_same_tokenizer(tokenizer, s.student.path, "student")
    else:
        student_config = student_config_from_dict(s.student.config, vocab)
    check_vocab(vocab, student_config.vocab_size, "student")
    check_buildable(teacher_config, "teacher.path")
    teacher_parameters = None
    if s.teacher.path is not None:
        from vkd_ds.teacher_load import check_checkpoint

        teacher_parameters = check_checkpoint(teacher_config, s.teacher.path).parameters
    check_buildable(student_config, "student.path" if s.student.path is not None else "student.config")
    # Tokenized once into token stores (found again by fingerprint on every later start).
    splits = open_splits(s.data, tokenizer)
    train_data = splits["train"][1]
    valid_data = splits["valid"][1] if "valid" in splits else []
    _check_prompts(s, train_data)
    layer_map = resolve_layer_map(s.feat.layer_map, num_layers(student_config), num_layers(teacher_config))
    objective = build_objective(s, layer_map, vocab)
    teacher_width, student_width = hidden_width(teacher_config), hidden_width(student_config)
    if objective.layer_map and teacher_width != student_width and not s.feat.projectors:
        raise VkdError(
            f"feat.projectors=false but the student's width ({student_width}) differs from the teacher's "
            f"({teacher_width}): feature KD needs projectors (feat.projectors=true) or equal widths"
        )
    if objective.fused_head:
        for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(student_config, key, None):
                raise VkdError(
                    f"loss.fused_head=true: the student's config sets {key}, so its logits are not "
                    "hidden @ W.T and the fused LM head would compute the wrong loss; set loss.fused_head=false"
                )
    if s.valence.teacher_head:
        load_head(s.valence.teacher_head, int(s.valence.k), teacher_width)
    manifest = None
    if s.teacher.cache:
        from vkd_ds.teacher_cache import check_for_training

        manifest = check_for_training(s, tokenizer, splits, s.valence_feeds_the_loss)
    notes = [note for _, rows in splits.values() for note in rows.notes()]
    packs = packed_rows(s.data.packing, train_data, int(s.data.max_seq_len), s.data.pack_length)
    return Prepared(
        tokenizer,
        student_config,
        train_data,
        valid_data,
        objective,
        teacher_width,
        notes,
        s,
        splits,
        manifest,
        teacher_parameters,
        packs,
    )


def _check_prompts(s: Settings, train_data: TokenRows) -> None:
    """The student samples from prompts (L_seq, on-policy steps): a record without a prompt takes its
    first seq_kd.prompt_tokens tokens, which must leave room for a completion in data.max_seq_len."""
    samples = s.loss.weights["seq"] > 0 or s.onpolicy.fraction > 0
    if not samples or s.seq_kd.prompt_tokens < s.data.max_seq_len:
        return
    textual = train_data.text_rows
    if textual:
        user = "onpolicy.fraction > 0" if s.onpolicy.fraction > 0 else "loss.seq > 0"
        raise VkdError(
            f"{user} samples from prompts, and {textual} row(s) of data.train_path have none: their "
            f"prompt is their first seq_kd.prompt_tokens ({s.seq_kd.prompt_tokens}) tokens, which leaves no room "
            f"in data.max_seq_len ({s.data.max_seq_len}); lower seq_kd.prompt_tokens"
        )


def build_student(s: Settings, prepared: Prepared, ds_config: dict, seed: int):
    """The student module of this config: LM, projectors, valence head, regularized parameters."""
    from vkd_ds import engines

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


class _TeacherLoadClock:
    """Each rank's time, peak resident set and share of the teacher while the teacher engine is built;
    `figures` (every rank's, gathered) once stopped."""

    def __init__(self):
        self.before = rss_bytes()
        reset_peak_rss()
        self.started = time.perf_counter()
        self.figures: dict = {}

    def stop(self, engine, bf16: bool) -> None:
        import torch

        from vkd_ds import engines

        seconds = time.perf_counter() - self.started
        local, total = engines.local_param_count(engine)
        mine = torch.tensor(
            [local, local * (2 if bf16 else 4) / GIB, seconds, peak_rss_bytes() / GIB, self.before / GIB],
            dtype=torch.float64,
        )
        rows = dist.all_gather(mine).tolist()
        self.figures = {
            "parameters": total,
            "bytes_per_parameter": 2 if bf16 else 4,
            "seconds": max(row[2] for row in rows),
            "ranks": [
                {
                    "parameters": int(r[0]),
                    "weights_gb": r[1],
                    "seconds": r[2],
                    "peak_rss_gb": r[3],
                    "rss_before_gb": r[4],
                }
                for r in rows
            ],
        }


def memory_per_rank(s: Settings) -> int:
    """Bytes a rank plans the layout and the loss chunks with (deepspeed.memory_per_rank_gb): `auto`,
    the least any rank has free (collective), so that every rank plans the same layout and chunks."""
    import torch

    if s.deepspeed.memory_per_rank_gb != "auto":
        return int(float(s.deepspeed.memory_per_rank_gb) * GIB)
    free = free_device_bytes(dist.on_gpu(), dist.local_world_size())
    return -int(dist.all_reduce_max(torch.tensor([-float(free)], dtype=torch.float64))[0])


def _plan_layout(
    s: Settings, prepared: Prepared, world: int, meta: dict | None, resume_from: Path | None, memory: int
) -> Layout:
    """The layout of this run (vkd_ds/layout.py): an `auto` student stage keeps the stage of the
    checkpoint resumed from, which DeepSpeed can only load into that stage."""
    from vkd_ds.ds_config import resolve_precision
    from vkd_ds.models import parameter_count

    return plan_layout(
        s,
        parameter_count(prepared.student_config),
        prepared.teacher_parameters if prepared.loads_teacher else None,
        world,
        resolve_precision(s, dist.on_gpu()) == "bf16",
        memory,
        # Only an `auto` stage asks (a checkpoint too old to tell is refused only then).
        _resumed_stage(resume_from, meta) if meta is not None and s.deepspeed.zero_stage == "auto" else None,
    )


def _resumed_stage(resume_from: Path, meta: dict) -> int:
    """The stage of the checkpoint resumed from; for one older than COMPLETE's record, its run's config.yaml
    (RUN_DIR/config.yaml beside RUN_DIR/checkpoints) may say it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    configured = None
    config = Path(resume_from).parent.parent / "config.yaml"
    if "zero_stage" not in meta and config.is_file():
        try:
            configured = OmegaConf.select(OmegaConf.load(config), "deepspeed.zero_stage")
        except (OmegaConfBaseException, ValueError, OSError):  # a damaged config.yaml tells nothing
            configured = None
    return checkpoint.written_stage(resume_from, meta, configured if isinstance(configured, int) else None)


def _resume_point(s: Settings, run_dir: Path) -> Path | None:
    if s.resume == "never":
        if checkpoint.complete_checkpoints(run_dir):
            raise VkdError(f"resume=never but {run_dir} already holds checkpoints; pick another run.dir or resume=auto")
        return None
    if s.resume == "auto":
        return checkpoint.latest_checkpoint(run_dir)
    return Path(s.resume)


def _write_run_files(s: Settings, run_dir: Path, prepared: Prepared) -> None:
    """Rank 0: the resolved config, and what export needs (student config, tokenizer)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(s.resolved))
    student_dir = run_dir / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    prepared.student_config.save_pretrained(student_dir)
    prepared.tokenizer.save_pretrained(student_dir)


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs the job on the process group the launcher started (or a group of one)."""
    import torch

    from vkd_ds import engines
    from vkd_ds.ds_config import checked_deepspeed_configs, student_lr_schedule
    from vkd_ds.gate import MercyGate
    from vkd_ds.rollout import StudentSampler
    from vkd_ds.seq_kd import SeqKDSettings, SequenceKD
    from vkd_ds.step_guard import GuardStop
    from vkd_ds.trainer import Trainer

    prepared = prepare(cfg)
    s = prepared.settings
    dist.init()
    tune_allocator = s.trainer.keep_freed_memory and not dist.on_gpu()
    if tune_allocator:
        from vkd_ds.malloc import keep_freed_memory, return_freed_memory

        return_freed_memory()  # until the teacher is loaded (vkd_ds/malloc.py)
    world = dist.world_size()
    check_global_batch(s, world)
    run_dir = Path(s.run.dir).resolve()
    resume_from = _resume_point(s, run_dir)
    # Read (and its files checked) once, before any engine is built or state touched.
    meta = checkpoint.read_meta(resume_from) if resume_from is not None else None
    changed_since_stop = None
    if not s.eval_only:
        resume_step = int(meta["step"]) if meta is not None else 0
        changed_since_stop = checkpoint.check_resume_after_stop(run_dir, resume_step, s.resolved)
    torch.manual_seed(s.trainer.seed)

    # Where each model lives, from their sizes and the memory free to a rank (explicit keys kept).
    memory = memory_per_rank(s)
    layout = _plan_layout(s, prepared, world, meta, resume_from, memory)
    s = with_layout(s, layout)
    prepared = dataclasses.replace(prepared, settings=s)
    # DeepSpeed checks both engines' JSON before either engine is built (and before anything is written).
    ds_config, teacher_ds = checked_deepspeed_configs(s, world, dist.on_gpu())
    objective = prepared.objective.planned(
        hidden_width(prepared.student_config),
        torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32,
        dist.on_gpu(),
        memory,
    )
    prepared = dataclasses.replace(prepared, objective=objective)
    eager = objective.attention > 0
    gate_settings = s.gate
    teacher = teacher_engine = teacher_load = None
    if s.teacher.cache:  # the settings refused every term that would need the live teacher
        from vkd_ds.teacher_cache import CachedTeacher

        teacher = CachedTeacher(s.teacher.cache, prepared.cache_manifest, prepared.data_splits, dist.device())
    # The gate's baseline is the teacher's valence of its own continuations: it needs both.
    elif prepared.loads_teacher:
        teacher_load = _TeacherLoadClock()
        teacher_engine = engines.build_teacher_engine(s.teacher.path, teacher_ds, eager)
        teacher_load.stop(teacher_engine, bool(teacher_ds["bf16"]["enabled"]))
        head = None
        if objective.teacher_valence or gate_settings.enabled:
            head = load_head(s.valence.teacher_head, int(s.valence.k), prepared.teacher_width).to(dist.device())
            head.requires_grad_(False)
        teacher = Teacher(teacher_engine, objective, head)
    allocator_tuned = tune_allocator and keep_freed_memory()
    if meta is not None and checkpoint.needs_universal(
        resume_from,
        meta,
        world,
        int(ds_config["zero_optimization"]["stage"]),  # deepspeed.extra may override deepspeed.zero_stage
        None if s.eval_only else check_global_batch(s, world),
        nvme_optimizer=ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "nvme",
    ):
        # Written by another number of ranks: DeepSpeed re-partitions a universal checkpoint.
        checkpoint.make_universal(resume_from)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    student = build_student(s, prepared, ds_config, s.trainer.seed)
    engine, _, _ = engines.build_student_engine(student, ds_config, student_lr_schedule(s, ds_config))
    if prepared.packs is not None and not s.eval_only:
        _check_packed_attention(engine, teacher if isinstance(teacher, Teacher) else None, prepared)
    # One sampler (and, gathered, one plain copy of the student) for sequence KD and the gate.
    sampler, gate = None, None
    training = not s.eval_only
    samples_needed = objective.lambdas["seq"] > 0 or s.onpolicy.fraction > 0
    if training and (samples_needed or (gate_settings.enabled and gate_settings.mode == "lookahead")):
        sampler = StudentSampler(engine, s.rollout.gather_student)
    if training and gate_settings.enabled:
        gate = MercyGate(
            gate_settings,
            engine,
            teacher,
            prepared.tokenizer,
            prepared.valid_data or prepared.train_data,
            int(s.trainer.seed),
            sampler,
            int(s.data.max_seq_len),
        )

    # The checkpoint is read before anything is written: a damaged one leaves the run directory as it was.
    client_state = None
    if meta is not None:
        client_state = checkpoint.load(engine, resume_from, meta, int(s.trainer.seed))
    if s.eval_only:
        return _evaluate_only(s, engine, teacher, prepared, run_dir, resume_from, client_state)
    # All checks passed and both engines exist: only now is the run directory written.
    if dist.is_main():
        _write_run_files(s, run_dir, prepared)
    dist.barrier()
    log = setup_logging(run_dir, dist.is_main())
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    log.info(
        "vkd-ds: %d rank(s) on %s, %s, ZeRO-%d student%s, global batch %d %s, run dir %s",
        world,
        dist.device_description(),
        "bf16" if ds_config["bf16"]["enabled"] else "fp32",
        int(ds_config["zero_optimization"]["stage"]),
        "" if offload == "none" else f" (optimizer offloaded to {offload})",
        check_global_batch(s, world),
        "sequences" if prepared.packs is None else f"packed rows of {prepared.packs.capacity} tokens",
        run_dir,
    )
    log.info("layout: %s", layout.describe() if prepared.loads_teacher else layout.describe(teacher=False))
    log.info("attention: %s", _attention_implementations(engine, teacher))
    for split, rows in (("train", prepared.train_data), ("valid", prepared.valid_data)):
        if rows:
            log.info("data: %s", rows.summary(split))
    for note in prepared.data_notes:
        log.warning("data: %s", note)
    if prepared.packs is not None:
        log.info(
            "data: %s; attention within each document (transformers' packed-sequence masks, from positions "
            "that restart per document; checked at start)",
            prepared.packs.summary(),
        )
    if s.teacher.cache:
        m = prepared.cache_manifest
        log.info(
            "teacher: not loaded; its top-%d at T=%g, entropy%s from the cache %s (%.0f bytes per token)",
            m["top_k"],
            m["temperature"],
            " and valence" if m["valence"] else "",
            s.teacher.cache,
            m["bytes_per_token"],
        )
    if teacher_load is not None:
        figures = teacher_load.figures
        log.info(
            "teacher: %.2fM parameters, %.2fM held by rank 0 (%s); loaded in %.1f s, "
            "peak RSS while loading %s GiB (ranks 0..%d), %.2f GiB of teacher weights per rank at most",
            figures["parameters"] / 1e6,
            figures["ranks"][0]["parameters"] / 1e6,
            "replicated" if s.teacher.layout == "replicated" else f"ZeRO-3, offload={s.teacher.offload_param}",
            figures["seconds"],
            ", ".join(f"{r['peak_rss_gb']:.2f}" for r in figures["ranks"]),
            world - 1,
            max(r["weights_gb"] for r in figures["ranks"]),
        )

    if allocator_tuned:
        log.info("host allocator: glibc mmap threshold 32 MiB, no trim (trainer.keep_freed_memory)")
    local, total = engines.local_param_count(engine)
    log.info(
        "student: %.2fM parameters, %.2fM held by rank 0 (%s)",
        total / 1e6,
        local / 1e6,
        s.student.path or f"new {prepared.student_config.model_type} from student.config",
    )
    log.info("objective: %s", " ".join(f"{t}={objective.lambdas[t]:g}" for t in objective.active))
    if "soft" in objective.active or "ce" in objective.active:
        d = objective.divergence
        log.info(
            "token losses: soft KD %s at T=%g; %s, %d tokens per chunk (%s)",
            d.kind,
            d.temperature,
            "from the fused LM head (no logits)" if objective.fused_head else "from the logits",
            objective.chunk_tokens,
            "loss.chunk_tokens" if s.loss.chunk_tokens != "auto" else "planned: loss.chunk_tokens=auto",
        )
    if objective.layer_map:
        widths = (hidden_width(prepared.student_config), prepared.teacher_width)
        log.info(
            "feature KD: student->teacher layers %s, %s",
            " ".join(f"{st}->{te}" for st, te in objective.layer_map),
            f"projectors {widths[0]}->{widths[1]}" if widths[0] != widths[1] else "no projectors (equal widths)",
        )
    seq_kd = None
    if samples_needed:
        seq_kd = SequenceKD(
            SeqKDSettings.from_settings(s),
            sampler,
            teacher,
            prepared.tokenizer,
            objective.chunk_tokens,
            seq_term=objective.lambdas["seq"] > 0,
        )
    if objective.lambdas["seq"] > 0:
        log.info(
            "sequence KD: %d tokens per rollout every %d step(s), student %s",
            s.seq_kd.n_gen,
            s.seq_kd.every_n_steps,
            sampler.mode,
        )
    if s.onpolicy.fraction > 0:
        log.info(
            "on-policy distillation: %g of the steps on the student's own samples (%d tokens, student %s); "
            "terms there: %s",
            s.onpolicy.fraction,
            s.seq_kd.n_gen,
            sampler.mode,
            " ".join(objective.active_at(rollout_step=False, on_policy=True)),
        )
    if gate_settings.enabled:
        arming = ""
        if gate_settings.mode == "proxy":
            arming = f" and the running batch valence MSE is below {gate_settings.arm_mse:g}"
        log.info(
            "mercy gate: %s mode, reject when projected valence < %g x the teacher's baseline; it arms after "
            "%d warm-up steps%s (gate.enabled=false turns it off)",
            gate_settings.mode,
            gate_settings.ratio,
            gate_settings.warmup_steps,
            arming,
        )
    trainer = Trainer(
        s,
        engine,
        teacher,
        objective,
        prepared.tokenizer,
        prepared.train_data,
        prepared.valid_data,
        run_dir,
        gate,
        seq_kd,
        prepared.packs,
    )
    if client_state is not None:
        trainer.restore(client_state)
        log.info("resumed from %s at step %d", resume_from, trainer.step)
    trainer.startup = {"teacher_load": teacher_load.figures if teacher_load is not None else None}
    # From here a step's `mem_peak_rss_gb` is training's own peak; loading's is in startup.json.
    reset_peak_rss()
    if changed_since_stop is not None:
        stop_step, changed = changed_since_stop
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


# A packed document's logits against the same document alone: fp32 agrees to ~1e-6, bf16 to ~1e-2; a
# document that sees another moves by a sizeable share of its logits.
PACKED_ATTENTION_TOLERANCE = 0.05


def _attention_implementations(engine, teacher) -> str:
    """The attention implementation of the student and of the live teacher, for the start-up log."""
    parts = [f"{engine.module.lm.config._attn_implementation} (student)"]
    if isinstance(teacher, Teacher):
        parts.append(f"{teacher.engine.module.config._attn_implementation} (teacher)")
    return ", ".join(parts)


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
