"""The teacher built already partitioned, then each rank's partitions copied in from the checkpoint.

A plain (possibly renamed) tensor is read partition by partition: each rank reads only the elements
of its own partition. A parameter that transformers builds from several tensors (a `WeightConverter`:
e.g. Mixtral's `experts.N.w1/w3` merged into `experts.gate_up_proj`) is built whole, for that one
parameter, from its source tensors with transformers' converter ops, this rank's slice copied in,
then freed: at most one converted tensor is whole on a rank at a time (with its sources while they
are merged, about twice its size), never the teacher.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from vkd_ds.errors import VkdError, library_reason
from vkd_ds.teacher_load.check import conversion_problem
from vkd_ds.teacher_load.files import NO_WEIGHTS, checkpoint_files
from vkd_ds.teacher_load.plan import (
    LoadPlan,
    Target,
    checkpoint_names,
    convert_tensors,
    converter_targets,
    model_shape,
    plan_load,
)
from vkd_ds.teacher_load.readers import open_checkpoint


def build_teacher_model(path: str, ds_config: dict[str, Any], dtype: torch.dtype, attention: dict[str, str]):
    """The teacher built already partitioned (zero.Init with `ds_config`; whole, on this rank's device,
    when `ds_config` is not ZeRO-3), weights not initialized, then loaded with `load_partitioned`,
    whatever the checkpoint's format; a VkdError where `path` holds none."""
    import contextlib

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from vkd_ds import dist

    if not checkpoint_files(path):
        raise VkdError(f"teacher.path: {path} {NO_WEIGHTS}")
    config = AutoConfig.from_pretrained(path)
    if ds_config["zero_optimization"]["stage"] == 3:
        placement = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:  # built where it runs: its tensors are read straight into device memory
        placement = torch.device(dist.device()) if dist.on_gpu() else contextlib.nullcontext()
    with no_init_weights(), prevent_arange_dtype_change(), placement:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    load_partitioned(model, path, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
    return model


def load_partitioned(model: torch.nn.Module, directory: str | Path, rank: int) -> None:
    """Copy the checkpoint in `directory` into `model`, built under zero.Init (its parameters
    partitioned), reading only this rank's partitions (and, for a parameter transformers converts,
    its sources, one parameter at a time). `check_checkpoint` has matched the files' names and shapes
    to the model beforehand (build_teacher_engine)."""
    params, aliases, _ = checkpoint_names(model)
    files = checkpoint_files(directory)
    plan = plan_load(model, files)
    loaded: set[str] = set()

    def place(name: str, read) -> None:
        canonical = aliases.get(name, name)
        if canonical in params:
            if canonical not in loaded:  # a tied weight may be stored under both its names
                _copy_into(params[canonical], read, rank)
                loaded.add(canonical)
        else:  # a persistent buffer: not partitioned
            buffer = model.get_buffer(name)
            with torch.no_grad():
                buffer.copy_(read(0, None).view(buffer.shape))
            buffer._is_hf_initialized = True

    # A plain tensor is read from its file; a converted one once the last file it reads from is open.
    order = {file: i for i, file in enumerate(files)}
    plain: dict[Path, list[Target]] = defaultdict(list)
    merged: dict[Path, list[Target]] = defaultdict(list)
    for target in plan.targets.values():
        if target.converter is None:
            plain[target.sources[0][2]].append(target)
        else:
            merged[max((file for _, _, file in target.sources), key=order.__getitem__)].append(target)
    for file in files:
        with open_checkpoint(file) as reader:
            for target in plain[file]:
                key = target.sources[0][1]
                place(target.name, lambda start, end, key=key: reader.read(key, start, end))
            for target in merged[file]:  # one converted parameter whole at a time, freed before the next
                _place_whole(_convert_whole(model, plan, target, file, reader, directory), place)
    missing = [name for name in params if name not in loaded]
    if missing:  # parameters transformers' rules let a checkpoint omit: initialized as transformers does
        _initialize(model, params, missing)


def _convert_whole(model, plan: LoadPlan, target: Target, file: Path, reader, directory) -> dict[str, torch.Tensor]:
    """`target`'s parameter(s), built whole from its sources with transformers' converter ops; each
    source cast to the parameter's dtype first, as transformers casts it. Sources in other files
    (experts split across shards) are read from them, each opened for this one conversion."""
    first = converter_targets(target)[0]
    dtype = model.get_parameter_or_buffer(first).dtype
    others: dict[Path, Any] = {}

    def fetch(key: str, source_file: Path) -> torch.Tensor:
        if source_file == file:
            source = reader
        else:
            source = others.get(source_file) or others.setdefault(source_file, open_checkpoint(source_file))
        tensor = source.read(key).view(plan.shapes[key][0])
        return tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor

    try:
        outputs = convert_tensors(model, target, fetch)
    except VkdError:
        raise
    except Exception as err:
        raise conversion_problem(model, plan, target, directory, f"an error: {library_reason(err)}") from None
    finally:
        for other in others.values():
            other.close()
    for name, tensor in outputs.items():
        expected = model_shape(model.get_parameter_or_buffer(name))
        if list(tensor.shape) != expected:
            what = f"shape {list(tensor.shape)} for {name!r}, the model's is {expected}"
            raise conversion_problem(model, plan, target, directory, what)
    return outputs


def _place_whole(outputs: dict[str, torch.Tensor], place) -> None:
    """Copy this rank's slice of each converted tensor in; each is freed as soon as it is copied."""
    while outputs:
        name, tensor = outputs.popitem()
        flat = tensor.reshape(-1)
        place(name, lambda start, end, flat=flat: flat[start:end])
        del tensor, flat


def _initialize(model, params: dict[str, torch.Tensor], missing: list[str]) -> None:
    """Initialize the parameters a checkpoint may omit (transformers' `_keys_to_ignore_on_load_missing`)
    as transformers' ZeRO-3 loading does: everything else marked initialized, the missing ones
    gathered, `initialize_weights` on rank 0, the result scattered back."""
    import deepspeed

    for name, param in params.items():
        if name not in missing:
            param._is_hf_initialized = True
    with deepspeed.zero.GatheredParameters([params[name] for name in missing], modifier_rank=0):
        model.initialize_weights()


def _copy_into(param: torch.Tensor, read, rank: int) -> None:
    """Copy this rank's part of a checkpoint tensor into `param`; `read(start, end)` gives elements
    [start, end) of the flattened tensor (end None: to its end)."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    with torch.no_grad():
        if not hasattr(param, "ds_tensor"):  # not partitioned: the whole tensor, one at a time
            param.data.copy_(read(0, None).view(param.shape))
            return
        start, end = _partition_range(param, rank)
        if end <= start:
            return  # this rank's partition is all padding
        swapped = param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE  # offload_param=nvme
        if swapped:
            param.nvme_swapper.swap_in([param], async_op=False)
        param.ds_tensor.data[: end - start].copy_(read(start, end))
        if swapped:
            param.nvme_swapper.swap_out_and_release([param])


def _partition_range(param: torch.Tensor, rank: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that this rank's ZeRO-3 partition holds."""
    size = param.partition_numel()
    start = rank * size
    return min(start, param.ds_numel), min(start + size, param.ds_numel)
