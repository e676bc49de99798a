"""`vkd-ds export RUN_DIR OUT_DIR`: a run's latest checkpoint as a plain Hugging Face directory.

Weights are consolidated from the ZeRO shards on disk (no process group
needed), so export runs on any machine with enough CPU memory for the student.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from vkd_ds import checkpoint
from vkd_ds.errors import VkdError
from vkd_ds.models import StudentModule
from vkd_ds.valence import ValenceHead, save_head

# The student's valence head, beside the exported model (docs/objective.md, Valence heads).
VALENCE_HEAD_FILE = "valence_head.safetensors"


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The student module's full fp32 state dict from a checkpoint written with any ZeRO stage."""
    sharded = (checkpoint_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists() or any(
        checkpoint_dir.glob("*optim_states.pt")
    )
    if not sharded:  # ZeRO-0: the module's full weights are in the model-states file
        state = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    if (
        any(checkpoint_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"))
        and not (checkpoint_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()
    ):
        return _bf16_optimizer_state_dict(checkpoint_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)


def _bf16_optimizer_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16 with fp32
    gradient accumulation), which DeepSpeed's zero_to_fp32 does not read: each rank holds a slice
    of every parameter group's flat fp32 master, the parameters laid end to end in `param_shapes`
    order (padding only at the end). Buffers and tied names come from the module's own state."""
    model = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = sorted(
        checkpoint_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
        key=lambda path: int(path.name.split("_")[4]),
    )
    slices = [
        torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"][
            "single_partition_of_fp32_groups"
        ]
        for path in ranks
    ]
    state = {name: value.float() for name, value in model["module"].items()}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([rank_slices[group] for rank_slices in slices])
        offset = 0
        for name, shape in shapes.items():
            numel = torch.Size(shape).numel()
            state[name] = flat[offset : offset + numel].view(shape).detach().clone()
            offset += numel
    for name, source in (model.get("shared_params") or {}).items():
        state[name] = state[source]
    return state


def export(run_dir: str | Path, out_dir: str | Path, checkpoint_dir: str | Path | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise VkdError(f"export: run directory not found: {run_dir}")
    if checkpoint_dir is None:
        checkpoint_dir = checkpoint.latest_checkpoint(run_dir)
        if checkpoint_dir is None:
            raise VkdError(f"export: {run_dir} holds no complete checkpoint")
    checkpoint_dir = Path(checkpoint_dir)
    student_dir = run_dir / "student"
    if not (student_dir / "config.json").is_file():
        raise VkdError(f"export: {student_dir}/config.json is missing; is {run_dir} a vkd-ds run directory?")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise VkdError(f"export: {out_dir} exists and is not empty")

    state = consolidated_state_dict(checkpoint_dir)
    prefix = StudentModule.LM_PREFIX
    lm_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    config = AutoConfig.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(lm_state, strict=False)
    model.tie_weights()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    if unexpected or set(missing) - tied:
        raise VkdError(
            f"export: checkpoint {checkpoint_dir} does not match the student config "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    # Write next to the target, then publish with one rename: a kill leaves no half-written export.
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    head_prefix = StudentModule.VALENCE_PREFIX
    head_state = {k[len(head_prefix) :]: v for k, v in state.items() if k.startswith(head_prefix)}
    if head_state:
        k, width = head_state["proj.weight"].shape
        head = ValenceHead(width, k)
        head.load_state_dict(head_state)
        save_head(head, staging / VALENCE_HEAD_FILE, source=str(checkpoint_dir))
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(staging)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(staging, out_dir)
    return out_dir
