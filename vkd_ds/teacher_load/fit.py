"""Will it fit? `check_teacher_fits` is the estimate made before anything is loaded: the teacher's
parameter count from its config (a model built on the meta device), against the memory its shards
land in. `nvme_swap_config` sizes DeepSpeed's parameter swap for a teacher offloaded to NVMe."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vkd_ds.errors import VkdError
from vkd_ds.memory import GIB, available_host_bytes


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
