"""The run's start: where it resumes from, where each model lives, the DeepSpeed configs checked and
the objective planned for the memory a rank has; the first builder, on the process group."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from vkd_ds import checkpoint, dist
from vkd_ds.builders.inputs import Prepared
from vkd_ds.config import check_global_batch
from vkd_ds.ds_config import checked_deepspeed_configs, resolve_precision
from vkd_ds.errors import VkdError
from vkd_ds.features import hidden_width
from vkd_ds.layout import Layout, plan_layout, with_layout
from vkd_ds.memory import GIB, free_device_bytes
from vkd_ds.models import parameter_count
from vkd_ds.settings import Settings


@dataclass
class Start:
    prepared: Prepared  # its settings carry the planned layout, its objective the planned chunks
    world: int
    run_dir: Path
    resume_from: Path | None
    meta: dict | None  # the checkpoint's, read (and its files checked) before anything is built
    changed_since_stop: tuple[int, list[str]] | None  # (step, changed keys) when resuming a stopped run
    layout: Layout
    ds_config: dict  # the student engine's
    teacher_ds: dict

    @property
    def settings(self) -> Settings:
        return self.prepared.settings

    @property
    def objective(self):
        return self.prepared.objective

    @property
    def global_batch(self) -> int:
        return check_global_batch(self.settings, self.world)

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config["bf16"]["enabled"])

    def log_startup(self, log) -> None:
        s, prepared, objective = self.settings, self.prepared, self.objective
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
        log.info(
            "vkd-ds: %d rank(s) on %s, %s, ZeRO-%d student%s, global batch %d %s, run dir %s",
            self.world,
            dist.device_description(),
            "bf16" if self.bf16 else "fp32",
            int(self.ds_config["zero_optimization"]["stage"]),
            "" if offload == "none" else f" (optimizer offloaded to {offload})",
            self.global_batch,
            "sequences" if prepared.packs is None else f"packed rows of {prepared.packs.capacity} tokens",
            self.run_dir,
        )
        log.info("layout: %s", self.layout.describe(teacher=prepared.loads_teacher))
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


def plan_start(prepared: Prepared) -> Start:
    """Collective (the layout plans from the least memory any rank has). Writes nothing: a run that
    resumes after a stop with nothing changed is refused here."""
    s = prepared.settings
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
    # DeepSpeed checks both engines' JSON before either engine is built (and before anything is written).
    ds_config, teacher_ds = checked_deepspeed_configs(s, world, dist.on_gpu())
    objective = prepared.objective.planned(
        hidden_width(prepared.student_config),
        torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32,
        dist.on_gpu(),
        memory,
    )
    prepared = dataclasses.replace(prepared, settings=s, objective=objective)
    return Start(prepared, world, run_dir, resume_from, meta, changed_since_stop, layout, ds_config, teacher_ds)


def memory_per_rank(s: Settings) -> int:
    """Bytes a rank plans the layout and the loss chunks with (deepspeed.memory_per_rank_gb): `auto`,
    the least any rank has free (collective), so that every rank plans the same layout and chunks."""
    if s.deepspeed.memory_per_rank_gb != "auto":
        return int(float(s.deepspeed.memory_per_rank_gb) * GIB)
    free = free_device_bytes(dist.on_gpu(), dist.local_world_size())
    return -int(dist.all_reduce_max(torch.tensor([-float(free)], dtype=torch.float64))[0])


def _plan_layout(
    s: Settings, prepared: Prepared, world: int, meta: dict | None, resume_from: Path | None, memory: int
) -> Layout:
    """The layout of this run (vkd_ds/layout.py): an `auto` student stage keeps the stage of the
    checkpoint resumed from, which DeepSpeed can only load into that stage."""
    return plan_layout(
        s,
        parameter_count(prepared.student_config),
        prepared.teacher_parameters if prepared.loads_teacher else None,
        world,
        resolve_precision(s, dist.on_gpu()) == "bf16",
        memory,
        # Only an `auto` stage asks (a checkpoint too old to tell is refused only then).
        resumed_stage(resume_from, meta) if meta is not None and s.deepspeed.zero_stage == "auto" else None,
    )


def resumed_stage(resume_from: Path, meta: dict) -> int:
    """The stage of the checkpoint resumed from; for one older than COMPLETE's record, its run's config.yaml
    (RUN_DIR/config.yaml beside RUN_DIR/checkpoints) may say it."""
    configured = None
    config = Path(resume_from).parent.parent / "config.yaml"
    if "zero_stage" not in meta and config.is_file():
        try:  # the resolved config as written at the run's start: plain YAML
            configured = (yaml.safe_load(config.read_text()) or {}).get("deepspeed", {}).get("zero_stage")
        except (yaml.YAMLError, AttributeError, OSError, UnicodeDecodeError):  # a damaged config.yaml tells nothing
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
