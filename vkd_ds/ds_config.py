"""The one place where DeepSpeed JSON is derived from the settings.

Batch sizes, precision, ZeRO stage, offload and the LR schedule are chosen
here and nowhere else (DeepSpeed-Chat's habit of patching `train_batch_size`
in many places is what this avoids).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from vkd_ds.config import check_global_batch
from vkd_ds.errors import VkdError, library_reason
from vkd_ds.layout import settled
from vkd_ds.schedule import lr_scheduler_factory
from vkd_ds.settings import Settings


def resolve_precision(cfg: Settings, on_gpu: bool) -> str:
    """`auto` is bf16 on GPUs and fp32 on CPUs (where bf16 runs, DeepSpeed's CPU accelerator supports
    it, but is slower than fp32 on most CPUs); `bf16` and `fp32` are taken as they are."""
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def _offload(device: str, nvme_path: str | None, on_gpu: bool) -> dict[str, Any]:
    if device == "nvme":
        return {"device": "nvme", "nvme_path": nvme_path}
    # Pinned host memory makes host-to-GPU copies asynchronous and about twice as fast; without a
    # GPU there is nothing to copy to, and DeepSpeed's CPU accelerator cannot pin memory.
    return {"device": "cpu", "pin_memory": on_gpu}


def _bf16_numerics(stage: int) -> dict[str, Any]:
    """Under bf16, gradients are reduced (all-reduce, or ZeRO's reduce-scatter) in fp32, and, under
    ZeRO 1-3, accumulated over micro-steps in fp32: bf16's 8-bit mantissa would otherwise round every
    micro-step's and every rank's contribution, and N ranks would no longer train like one.
    DeepSpeed accumulates in fp32 only with ZeRO >= 1 (ZeRO-0 in bf16 accumulates in bf16)."""
    numerics: dict[str, Any] = {"communication_data_type": "fp32"}
    if stage >= 1:
        numerics["data_types"] = {"grad_accum_dtype": "fp32"}
    return numerics


def student_ds_config(cfg: Settings, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed JSON of the student engine (optimizer included; the LR schedule is student_lr_schedule's),
    for the planned layout (layout.with_layout; `auto` left in `cfg` reads as layout.settled)."""
    cfg = settled(cfg)
    trainer = cfg.trainer
    global_batch = check_global_batch(cfg, world_size)
    precision = resolve_precision(cfg, on_gpu)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        # Export and the equivalence tests read consolidated weights; keep them gatherable.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.deepspeed.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(cfg.deepspeed.offload_optimizer, cfg.deepspeed.nvme_path, on_gpu)
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": trainer.lr,
                "betas": list(trainer.betas),
                "eps": 1e-8,
                "weight_decay": trainer.weight_decay,
                # torch's AdamW: no JIT-compiled op needed (DeepSpeedCPUAdam is used with offload).
                "torch_adam": cfg.deepspeed.offload_optimizer == "none",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    extra = copy.deepcopy(cfg.deepspeed.extra)
    ds = _merge(ds, extra)
    if ds["bf16"].get("enabled"):
        # After the merge: `deepspeed.extra` may set the stage, or these keys itself.
        for key, value in _bf16_numerics(int(ds["zero_optimization"]["stage"])).items():
            ds.setdefault(key, value)
    return ds


def student_lr_schedule(cfg: Settings, ds_config: dict[str, Any]):
    """The LR schedule to hand `deepspeed.initialize` (vkd_ds/schedule.py), or None when the user's
    `deepspeed.extra` names a DeepSpeed `scheduler` of its own (DeepSpeed then builds that one)."""
    if "scheduler" in ds_config:
        return None
    trainer = cfg.trainer
    return lr_scheduler_factory(int(trainer.warmup_steps), int(trainer.max_steps), float(trainer.min_lr_ratio))


TEACHER_MAX_LIVE_PARAMETERS = 3 * 10**7  # gathered teacher elements kept at once (one larger is still gathered)
TEACHER_PREFETCH_ELEMENTS = 10**7  # gathered ahead of use


def teacher_ds_config(cfg: Settings, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed JSON of the frozen teacher: whole on every rank (teacher.layout=replicated), or ZeRO-3
    inference, its shards on the device or offloaded (teacher.offload_param)."""
    cfg = settled(cfg)
    precision = resolve_precision(cfg, on_gpu)
    if cfg.teacher.layout == "replicated":
        return {
            "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": False},
            "steps_per_print": 10**9,
        }
    zero: dict[str, Any] = {
        "stage": 3,
        # The frozen teacher runs one forward per micro-batch and never reuses a layer within it:
        # release each layer's gathered weights after use, and gather little ahead. DeepSpeed's
        # defaults (1e9 live parameters, reuse distance 1e9, prefetch 5e7) keep up to a billion
        # gathered elements alive once the first forward has traced the model
        # (bench/teacher_forward_memory.py, a 1.1 B teacher on 2 ranks: 6.36 GB per rank at its
        # peak from the second forward on, and 13-16 s a forward, against 3.33 GB and 10 s).
        "stage3_max_live_parameters": TEACHER_MAX_LIVE_PARAMETERS,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": TEACHER_PREFETCH_ELEMENTS,
    }
    if cfg.teacher.offload_param != "none":
        zero["offload_param"] = _offload(cfg.teacher.offload_param, cfg.teacher.nvme_path, on_gpu)
    return {
        # DeepSpeed requires a batch size even for an engine that never steps.
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def checked_deepspeed_configs(cfg: Settings, world_size: int, on_gpu: bool) -> tuple[dict, dict]:
    """Both engines' JSON (student, teacher), validated by DeepSpeed's own config class with
    `deepspeed.extra` merged in, before any engine or process exists: a key or value DeepSpeed
    refuses is one VkdError naming it."""
    student, teacher = student_ds_config(cfg, world_size, on_gpu), teacher_ds_config(cfg, on_gpu)
    for engine, ds in (("student", student), ("teacher", teacher)):
        check_deepspeed_config(ds, world_size, engine)
    return student, teacher


def check_deepspeed_config(ds: dict[str, Any], world_size: int, engine: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    ds = copy.deepcopy(ds)
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps", 1)
    batch = ds.get("train_batch_size")
    if all(isinstance(v, int) for v in (micro, accum, batch)):
        if batch != micro * accum * world_size:
            raise VkdError(
                f"deepspeed.extra: the {engine}'s train_batch_size ({batch}) is not train_micro_batch_size_per_gpu "
                f"({micro}) x gradient_accumulation_steps ({accum}) x world size ({world_size}) = "
                f"{micro * accum * world_size}; set the batch with trainer.* keys, not deepspeed.extra"
            )
        if not torch.distributed.is_initialized():
            # Without a process group DeepSpeed's checks see a world of one rank: the same batch, per rank.
            ds["train_batch_size"] = micro * accum
    try:
        DeepSpeedConfig(ds)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise VkdError(
            f"deepspeed.extra: DeepSpeed refuses the {engine}'s config: {err.title} `{where}`: {first['msg']}"
        ) from None
    except Exception as err:  # DeepSpeed's sanity checks raise AssertionError, ValueError, ...
        raise VkdError(f"deepspeed.extra: DeepSpeed refuses the {engine}'s config: {library_reason(err)}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base
