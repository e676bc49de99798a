"""Builds the two DeepSpeed engines: the frozen, sharded teacher and the trained student.

Both models are constructed under `deepspeed.zero.Init` (through transformers'
ZeRO-3 integration) when their engine is ZeRO-3, so neither is ever whole on
one rank.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# These modules patch torch at import time; importing them inside zero.Init's
# tensor-construction hooks breaks, so import them first.
import torch._dynamo  # noqa: F401
import transformers.generation.utils  # noqa: F401
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from vkd_ds.errors import VkdError
from vkd_ds.models import StudentModule


@contextlib.contextmanager
def _zero3_construction(ds_config: dict[str, Any]):
    """While alive, transformers builds models under zero.Init with this DeepSpeed config."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # registers itself through a weak reference
    try:
        yield
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()


def _dtype(ds_config: dict[str, Any]) -> torch.dtype:
    return torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32


def _initialize(**kwargs):
    import deepspeed

    try:
        return deepspeed.initialize(**kwargs)
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise VkdError(f"bad DeepSpeed settings: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    """The exception's message; for a bare `assert` (DeepSpeed has many), where it failed and its source."""
    message = str(err).strip()
    if message:
        return message.splitlines()[0]
    import traceback

    frame = traceback.extract_tb(err.__traceback__)[-1]
    where = frame.filename.split("site-packages/")[-1]
    return f"{type(err).__name__} at {where}:{frame.lineno}: {(frame.line or '').strip()}"


def _attention_kwargs(eager_attention: bool) -> dict[str, str]:
    """transformers' default attention (PyTorch's SDPA, which runs flash-attention kernels on recent
    GPUs for unmasked causal rows), or eager attention for the attention-map term, which reads
    attention probabilities. FlashAttention-2 is not chosen here: transformers keeps packed documents
    apart with it only in micro-batches of one row, and the start-up check would refuse the others
    (untested on a GPU). The start-up log names what each model runs."""
    return {"attn_implementation": "eager"} if eager_attention else {}


def build_teacher_engine(path: str, ds_config: dict[str, Any], eager_attention: bool = False):
    """The teacher: a DeepSpeed inference engine, frozen, eval mode, never checkpointed; ZeRO-3 or
    whole on every rank (teacher.layout, `ds_config`'s stage 3 or 0). Its checkpoint (safetensors or
    `.bin`, one file or shards) is read file by file into each rank's partitions (or whole tensors),
    its tensors renamed and converted as transformers does (vkd_ds/teacher_load/), so under ZeRO-3
    no rank holds the whole teacher."""
    from vkd_ds import dist
    from vkd_ds.models import load_model_config
    from vkd_ds.teacher_load import build_teacher_model, check_checkpoint, check_teacher_fits, nvme_swap_config

    # Before a byte of weights is read: will this node's (or GPU's) shards fit? Decided together,
    # so a rank that refuses does not leave the others waiting in a collective.
    shape = check_checkpoint(load_model_config(path, "teacher.path"), path)
    refusal = None
    sharded = ds_config["zero_optimization"]["stage"] == 3
    try:
        # A replicated teacher is whole on every rank: the fit of one shard of one.
        world = dist.world_size() if sharded else 1
        check_teacher_fits(shape.parameters, ds_config, world, dist.local_world_size(), dist.on_gpu())
    except VkdError as err:
        refusal = err
    if dist.any_rank(refusal is not None):
        raise refusal or VkdError("teacher.path: the teacher does not fit on another node (its rank 0 log says why)")
    if ds_config["zero_optimization"].get("offload_param", {}).get("device") == "nvme":
        ds_config = nvme_swap_config(ds_config, shape.largest, dist.world_size())
    attention = _attention_kwargs(eager_attention)
    try:
        model = build_teacher_model(path, ds_config, _dtype(ds_config), attention)
    except (OSError, ValueError) as err:
        raise VkdError(f"teacher.path: cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None
    model.requires_grad_(False)
    model.eval()
    engine, *_ = _initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def build_student_model(
    path: str | None, model_config, ds_config: dict[str, Any], seed: int, eager_attention: bool = False, **extras
) -> StudentModule:
    """The student module, from a local directory or freshly initialized from `model_config`;
    `extras` (layers, projectors, valence head, regularized parameters) go to StudentModule."""
    torch.manual_seed(seed)  # a fresh student's init is a function of the seed only
    attention = _attention_kwargs(eager_attention)
    with _zero3_construction(ds_config):
        if path is not None:
            try:
                lm = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(ds_config), **attention)
            except (OSError, ValueError) as err:
                raise VkdError(
                    f"student.path: cannot load a causal LM from {path}: {str(err).splitlines()[0]}"
                ) from None
        else:
            lm = AutoModelForCausalLM.from_config(model_config, dtype=_dtype(ds_config), **attention)
    # Building under zero.Init draws random numbers differently; re-seed so the projectors'
    # and valence head's init depends on the seed only, whatever the ZeRO stage.
    torch.manual_seed(seed + 1)
    student = StudentModule(lm, attention=eager_attention, dtype=_dtype(ds_config), **extras)
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for param in student.external_params:
        # Under ZeRO-3 this keeps them gathered for the whole forward and backward of the module,
        # which reads them outside their own submodules; a no-op for other stages.
        register_external_parameter(student, param)
    return student


def build_student_engine(student: StudentModule, ds_config: dict[str, Any], lr_schedule=None):
    """The student's training engine: the optimizer comes from `ds_config`, the LR schedule from
    `lr_schedule` (ds_config.student_lr_schedule; None: `ds_config`'s own, or a constant LR)."""
    engine, optimizer, _, scheduler = _initialize(
        model=student,
        model_parameters=[p for p in student.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_schedule,
    )
    return engine, optimizer, scheduler


def local_param_count(engine) -> tuple[int, int]:
    """(elements held by this rank, elements in the whole model) of a ZeRO-3 engine."""
    local = total = 0
    for param in engine.module.parameters():
        if hasattr(param, "ds_tensor"):
            local += param.partition_numel()  # ds_tensor itself is empty while swapped out to NVMe
            total += param.ds_numel
        else:
            local += param.numel()
            total += param.numel()
    return local, total
