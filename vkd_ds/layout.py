"""Where each model lives: the cheapest layout that fits (`deepspeed.zero_stage=auto`,
`teacher.layout=auto`, `teacher.offload_param=auto`, the defaults).

ZeRO-3 gathers every layer before its use and releases it after, in the forward and again in the
backward: on models that fit whole on one device that is pure cost. So the student trains on ZeRO-0
(one rank) or ZeRO-2 (several: gradients and optimizer state sharded, weights whole) when its
training state fits, on ZeRO-3 when not; the teacher runs whole on every device (replicated, no
DeepSpeed partitioning) when its weights fit beside the student, else ZeRO-3 inference with its
shards on the device, else offloaded to host memory. An explicit value of any of these keys is
taken as it is, and the rest decided around it.

The figures are the models' states only (weights, gradients, optimizer state); activations, logits
and workspace take the rest, so the states may use `STATE_SHARE` of the memory free to a rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vkd_ds.memory import GIB
from vkd_ds.settings import Settings

STATE_SHARE = 0.5  # of the memory free to a rank, for the two models' states; the rest for activations
ADAM_BYTES = 8  # two fp32 moments per parameter


@dataclass(frozen=True)
class Layout:
    student_stage: int
    teacher: str  # replicated | zero3
    teacher_offload: str  # none | cpu | nvme (zero3 only)
    reason: str  # what decided it, for the start-up log

    def describe(self, teacher: bool = True) -> str:
        """What the start-up log says; `teacher` False: no teacher is loaded (teacher.cache)."""
        where = "replicated on every rank" if self.teacher == "replicated" else "ZeRO-3"
        if self.teacher == "zero3" and self.teacher_offload != "none":
            where += f", its shards offloaded to {self.teacher_offload}"
        models = f"student ZeRO-{self.student_stage}" + (f", teacher {where}" if teacher else "")
        return f"{models} ({self.reason})"


def student_state_bytes(parameters: int, stage: int, world: int, bf16: bool, offload_optimizer: bool = False) -> int:
    """Bytes of the student's training state per rank on its device: weights and gradients in the
    training dtype, and (unless offloaded) Adam's two fp32 moments plus, under bf16, fp32 master
    weights and fp32 gradient accumulation. ZeRO-1/2 divide the optimizer's part by the ranks, ZeRO-3
    all of it."""
    width = 2 if bf16 else 4
    whole = 2 * width  # weights and gradients
    optimizer = 0 if offload_optimizer else ADAM_BYTES + (8 if bf16 else 0)
    if stage == 0:
        per_parameter = whole + optimizer
    elif stage in (1, 2):
        per_parameter = whole + optimizer / world
    else:
        per_parameter = (whole + optimizer) / world
    return int(parameters * per_parameter)


def teacher_bytes(parameters: int, layout: str, offload: str, world: int, bf16: bool) -> int:
    """Bytes of the teacher's weights on each rank's device (0 when offloaded)."""
    if layout == "zero3" and offload != "none":
        return 0
    whole = parameters * (2 if bf16 else 4)
    return whole if layout == "replicated" else -(-whole // world)


def plan_layout(
    s: Settings,
    student_parameters: int,
    teacher_parameters: int | None,
    world: int,
    bf16: bool,
    free_bytes: int,
    resumed_stage: int | None = None,
) -> Layout:
    """The layout for these models on `world` ranks with `free_bytes` free to each rank. `resumed_stage`:
    the student's ZeRO stage in the checkpoint resumed from (auto keeps it: a checkpoint loads into the
    stage that wrote it). `teacher_parameters` None: no teacher is loaded (teacher.cache)."""
    budget = int(free_bytes * STATE_SHARE)
    offload_optimizer = s.deepspeed.offload_optimizer != "none"
    if s.deepspeed.zero_stage != "auto":
        stages, decided = [int(s.deepspeed.zero_stage)], ["student: deepspeed.zero_stage"]
    elif resumed_stage is not None:
        stages, decided = [resumed_stage], ["student: the checkpoint's stage"]
    else:
        # One rank: nothing to shard, except that bf16 ZeRO-0 accumulates micro-steps' gradients in
        # bf16 (ZeRO >= 1: in fp32). Several: ZeRO-2 communicates as much as ZeRO-0 and holds less.
        cheapest = 0 if world == 1 and not (bf16 and s.trainer.grad_accum > 1) else (1 if world == 1 else 2)
        stages, decided = [max(cheapest, 1) if offload_optimizer else cheapest, 3], []
        if s.deepspeed.offload_optimizer == "nvme":  # DeepSpeed swaps optimizer state to NVMe only under ZeRO-3
            stages, decided = [3], ["student: deepspeed.offload_optimizer=nvme"]
    choices = _teacher_choices(s, teacher_parameters is not None)
    options = [(stage, teacher) for stage in stages for teacher in choices]
    for stage, (layout, offload) in options:
        states = student_state_bytes(student_parameters, stage, world, bf16, offload_optimizer)
        states += teacher_bytes(teacher_parameters or 0, layout, offload, world, bf16)
        if states <= budget or (stage, (layout, offload)) == options[-1]:
            reason = f"the models' states take {states / GIB:.2f} GiB of {free_bytes / GIB:.2f} GiB free per rank"
            if states > budget:
                reason += f", more than the {STATE_SHARE:.0%} auto plans for, and nothing it may choose takes less"
            return Layout(stage, layout, offload, "; ".join([*decided, reason]))
    raise AssertionError("unreachable: the last option is always taken")


def _teacher_choices(s: Settings, loads_teacher: bool) -> list[tuple[str, str]]:
    """(layout, offload) for the teacher, cheapest first, as its keys allow."""
    if not loads_teacher:
        return [("zero3", "none")]  # nothing is built; a placeholder that takes no memory here
    layout, offload = s.teacher.layout, s.teacher.offload_param
    if layout == "replicated":
        return [("replicated", "none")]
    if offload != "auto":  # an explicit offload is a ZeRO-3 teacher's
        return [("zero3", offload)]
    if layout == "zero3":
        return [("zero3", "none"), ("zero3", "cpu")]
    return [("replicated", "none"), ("zero3", "none"), ("zero3", "cpu")]


def with_layout(s: Settings, layout: Layout) -> Settings:
    """The settings with the layout's choices in place of `auto` (what the DeepSpeed JSON is built from)."""
    deepspeed = replace(s.deepspeed, zero_stage=layout.student_stage)
    teacher = replace(s.teacher, layout=layout.teacher, offload_param=layout.teacher_offload)
    return replace(s, deepspeed=deepspeed, teacher=teacher)


def settled(s: Settings) -> Settings:
    """The settings with any `auto` left (no layout planned: the launcher's checks before the ranks
    exist, tools that build one engine) read as the layout before planning: ZeRO-3 for the student
    and for the teacher, its shards offloaded to host memory."""
    stage = 3 if s.deepspeed.zero_stage == "auto" else int(s.deepspeed.zero_stage)
    layout = "zero3" if s.teacher.layout == "auto" else s.teacher.layout
    offload = s.teacher.offload_param
    if offload == "auto":
        offload = "none" if layout == "replicated" else "cpu"
    return with_layout(s, Layout(stage, layout, offload, ""))
