"""The teacher's weights, shard by shard, straight into its ZeRO-3 partitions; and whether they fit.

transformers' ZeRO-3 loading merges every checkpoint file into one state dict on rank 0 and
gathers each layer to copy it in, so rank 0 holds the whole teacher at once
(bench/teacher_load_peak.py, a 1.1 B teacher in bf16 files on 2 ranks: rank 0 peaked at 5.34 GB,
against 2.73-2.80 GB here). Here each rank builds the model already partitioned (zero.Init, no
weight init), then reads from each safetensors file only the elements of its own partition of
each tensor and copies them into that partition: no gather, no collective, and at any moment a
rank holds its share plus its part of the one tensor it is reading. Files are read with plain
reads, not mmap, so no file page stays in a rank's resident set either.

`check_teacher_fits` is the estimate made before anything is loaded: the teacher's parameter
count from its config (a model built on the meta device), against the memory its shards land in.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vkd_ds.errors import VkdError
from vkd_ds.memory import GIB, available_host_bytes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(directory: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded through its index, or one file); [] for none."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise VkdError(f"teacher.path: {index} is not a safetensors index ({err})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise VkdError(f"teacher.path: {index} names {file.name}, which is missing")
        return files
    single = directory / SINGLE_FILE
    return [single] if single.is_file() else []


def _partition_range(param: torch.Tensor, rank: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that this rank's ZeRO-3 partition holds."""
    size = param.partition_numel()
    start = rank * size
    return min(start, param.ds_numel), min(start + size, param.ds_numel)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads element ranges of the tensors in one safetensors file with plain reads, not mmap: the
    bytes land in a buffer this process owns and frees, and no mapped page of the file stays
    counted in its resident set (the format: 8-byte header length, JSON header, raw data)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            (length,) = struct.unpack("<Q", self.handle.read(8))
            header = json.loads(self.handle.read(length))
        except (struct.error, ValueError) as err:
            self.handle.close()
            raise VkdError(f"teacher.path: {path.name} is not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key`, as a 1-D tensor of its stored dtype."""
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise VkdError(
                f"teacher.path: {self.path.name} stores {key!r} as {entry['dtype']}, which vkd-ds cannot read"
            )
        dtype = _DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        end = math.prod(entry["shape"]) if end is None else end
        first, _ = entry["data_offsets"]
        buffer = torch.empty((end - start) * size, dtype=torch.uint8)
        self.handle.seek(self.data_start + first + start * size)
        if self.handle.readinto(buffer.numpy()) != buffer.numel():
            raise VkdError(f"teacher.path: {self.path.name} is truncated (reading {key!r})")
        return buffer.view(dtype)


def _checkpoint_names(model: torch.nn.Module) -> tuple[dict, dict, dict]:
    """(parameters by name, each name a checkpoint may use -> the parameter's first name, buffers):
    a tied weight is one parameter with two names, stored under either or both."""
    params = dict(model.named_parameters())
    canonical = {id(p): name for name, p in params.items()}
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    return params, aliases, dict(model.named_buffers())


def load_partitioned(model: torch.nn.Module, directory: str | Path, rank: int) -> None:
    """Copy the checkpoint in `directory` into `model`, built under zero.Init (its parameters
    partitioned), reading only this rank's partitions. `check_checkpoint` has matched the files'
    names and shapes to the model beforehand (build_teacher_engine)."""
    params, aliases, buffers = _checkpoint_names(model)
    loaded = set()
    for file in safetensors_files(directory):
        with SafetensorsReader(file) as handle:
            for key in handle.keys():
                name = aliases.get(key, key)
                if name in buffers:
                    with torch.no_grad():
                        buffers[name].copy_(handle.read(key).view(buffers[name].shape))
                elif name not in loaded:  # a tied weight may be stored under both its names
                    _copy_into(params[name], handle, key, rank)
                    loaded.add(name)


def _copy_into(param: torch.Tensor, handle: SafetensorsReader, key: str, rank: int) -> None:
    """Copy this rank's part of checkpoint tensor `key` into `param`."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    with torch.no_grad():
        if not hasattr(param, "ds_tensor"):  # not partitioned: the whole tensor, one at a time
            param.data.copy_(handle.read(key).view(param.shape))
            return
        start, end = _partition_range(param, rank)
        if end <= start:
            return  # this rank's partition is all padding
        swapped = param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE  # offload_param=nvme
        if swapped:
            param.nvme_swapper.swap_in([param], async_op=False)
        param.ds_tensor.data[: end - start].copy_(handle.read(key, start, end))
        if swapped:
            param.nvme_swapper.swap_out_and_release([param])


def build_teacher_model(path: str, ds_config: dict[str, Any], dtype: torch.dtype, attention: dict[str, str]):
    """The teacher built already partitioned (zero.Init with `ds_config`), weights not initialized,
    then loaded with `load_partitioned`. None when `path` holds no safetensors checkpoint (the caller
    falls back to transformers' loading)."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if not safetensors_files(path):
        return None
    config = AutoConfig.from_pretrained(path)
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    load_partitioned(model, path, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
    return model


# -- will it fit? -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherShape:
    parameters: int
    largest: int  # elements of its largest parameter


def check_checkpoint(config, directory: str | Path) -> TeacherShape:
    """The teacher's parameter count and largest parameter, from a model built from `config` on the
    meta device; where `directory` holds a safetensors checkpoint, its headers are checked against
    that model first: every parameter present with its shape, nothing the model lacks (the loader
    relies on it). Reads headers only."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    params, aliases, buffers = _checkpoint_names(model)
    found: set[str] = set()
    for file in safetensors_files(directory):
        with SafetensorsReader(file) as reader:
            for key in reader.keys():
                name = aliases.get(key, key)
                if name in buffers:
                    continue
                if name not in params:
                    raise VkdError(
                        f"teacher.path: {file.name} holds {key!r}, which the model built from its config lacks"
                    )
                if reader.shape(key) != list(params[name].shape):
                    raise VkdError(
                        f"teacher.path: {file.name} holds {key!r} with shape {reader.shape(key)}, "
                        f"the model's is {list(params[name].shape)}"
                    )
                found.add(name)
    missing = sorted(set(params) - found) if found else []
    if missing:
        raise VkdError(f"teacher.path: the checkpoint in {directory} lacks {_names(missing)}")
    return TeacherShape(sum(p.numel() for p in params.values()), max(p.numel() for p in params.values()))


def _names(missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{len(missing)} parameter(s): {shown}"


@dataclass(frozen=True)
class FitEstimate:
    parameters: int
    bytes_per_parameter: int
    world_size: int
    local_ranks: int
    where: str  # "host memory", "GPU memory", "the NVMe path's disk"
    available: int

    @property
    def teacher_bytes(self) -> int:
        return self.parameters * self.bytes_per_parameter

    @property
    def share_bytes(self) -> int:
        return -(-self.teacher_bytes // self.world_size)

    @property
    def needed(self) -> int:
        """What this node (or this GPU) must hold of the teacher alone."""
        per = 1 if self.where == "GPU memory" else self.local_ranks
        return per * self.share_bytes

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def message(self) -> str:
        per = "this GPU holds" if self.where == "GPU memory" else f"this node's {self.local_ranks} rank(s) hold"
        return (
            f"teacher.path: the teacher does not fit: {self.parameters:,} parameters are "
            f"{self.teacher_bytes / GIB:.2f} GiB at {self.bytes_per_parameter} bytes each; ZeRO-3 shards them over "
            f"{self.world_size} rank(s), so {per} {self.needed / GIB:.2f} GiB in {self.where}, but only "
            f"{self.available / GIB:.2f} GiB is available there. Run on more ranks or nodes, in bf16, or with "
            "teacher.offload_param=nvme"
        )


def estimate_fit(
    parameters: int, bf16: bool, offload: str, nvme_path: str | None, world_size: int, local_ranks: int, on_gpu: bool
) -> FitEstimate:
    """Where the teacher's shards live and how much room there is, before anything is loaded."""
    if offload == "nvme":
        where, available = "the NVMe path's disk", _disk_free(nvme_path)
    elif on_gpu and offload == "none":
        where, available = "GPU memory", torch.cuda.mem_get_info()[1]
    else:
        where, available = "host memory", available_host_bytes()
    return FitEstimate(parameters, 2 if bf16 else 4, world_size, local_ranks, where, available)


def check_teacher_fits(
    parameters: int, ds_config: dict[str, Any], world_size: int, local_ranks: int, on_gpu: bool
) -> FitEstimate:
    """The estimate for the teacher engine's `ds_config`; a VkdError with its numbers where it does not fit."""
    offload = ds_config["zero_optimization"].get("offload_param", {})
    estimate = estimate_fit(
        parameters,
        bool(ds_config["bf16"]["enabled"]),
        offload.get("device", "none"),
        offload.get("nvme_path"),
        world_size,
        local_ranks,
        on_gpu,
    )
    if not estimate.fits:
        raise VkdError(estimate.message())
    return estimate


def nvme_swap_config(ds_config: dict[str, Any], largest: int, world_size: int) -> dict[str, Any]:
    """`ds_config` with its NVMe parameter swap sized for this teacher, in a folder of this process.

    DeepSpeed swaps each partition through pinned buffers that must hold the largest partition (its
    default, 1e8 elements in 5 buffers, is 2 GB of locked memory per rank); the teacher gathers
    little ahead (ds_config.TEACHER_PREFETCH_ELEMENTS), so 4 buffers. Two jobs given one nvme_path
    would overwrite each other's swap files (both write rank0/, rank1/, ...): each process swaps
    under its own folder, removed when it exits (a killed one leaves it behind; safe to delete)."""
    import atexit
    import copy
    import shutil
    import socket

    ds = copy.deepcopy(ds_config)
    offload = ds["zero_optimization"]["offload_param"]
    folder = Path(offload["nvme_path"]) / f"vkd-ds-{socket.gethostname()}-{os.getpid()}"
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    offload["nvme_path"] = str(folder)
    offload.setdefault("buffer_size", max(-(-largest // world_size), 2**20))
    offload.setdefault("buffer_count", NVME_BUFFERS)
    return ds


NVME_BUFFERS = 4


def _disk_free(path: str | None) -> int:
    probe = Path(path or ".").resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize
