"""Every collective vkd-ds issues lives here (losses and models never talk to other ranks).

Reductions are of sums (numerators and denominators), never of means: a mean
of per-rank means is wrong under masks and sample weights.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from vkd_ds.errors import VkdError


def on_gpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def free_port() -> int:
    """A port free on this machine now, for a rendezvous started here."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init() -> None:
    """Join the process group started by the deepspeed launcher (or make a group of one)."""
    import deepspeed

    if torch_dist.is_initialized():
        return
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if on_gpu() else "gloo"
    if on_gpu():
        global _LAUNCHER_LOCAL_RANK
        _LAUNCHER_LOCAL_RANK = local_rank()
        index = device_index(_LAUNCHER_LOCAL_RANK, torch.cuda.device_count(), "SLURM_LOCALID" in os.environ)
        if index != _LAUNCHER_LOCAL_RANK:
            # DeepSpeed's engine picks its device from LOCAL_RANK too: both must name a visible device.
            os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    if not on_gpu():
        _unlink_shm_buffer()


# LOCAL_RANK as the launcher gave it, before init() maps it to a visible GPU (see device_index).
_LAUNCHER_LOCAL_RANK: int | None = None


def launcher_local_rank() -> int:
    return local_rank() if _LAUNCHER_LOCAL_RANK is None else _LAUNCHER_LOCAL_RANK


def device_index(local: int, visible: int, under_slurm: bool) -> int:
    """The GPU a rank uses, among the `visible` ones. Launchers that show every process all of its
    node's GPUs (deepspeed, torchrun) set LOCAL_RANK to pick one; SLURM sites that bind one GPU per
    task (--gpus-per-task=1, --gpu-bind) show each task a single device, index 0, whatever its
    SLURM_LOCALID. Elsewhere a LOCAL_RANK past the visible GPUs means more processes than GPUs."""
    if local < visible:
        return local
    if visible == 1 and under_slurm:
        return 0
    raise VkdError(
        f"LOCAL_RANK={local} but this process sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each process "
        "every GPU of its node (or, under SLURM, exactly one), and start at most one process per GPU"
    )


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU accelerator gives each rank a 66 MB shared-memory all-reduce buffer in
    /dev/shm and never removes it: every run would leak RAM (/dev/shm is memory) until reboot.
    Once every rank has mapped every buffer (a barrier after init), the names can go; the
    mappings live on until the processes exit."""
    where = f"{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{where}_{rank()}"
    if world_size() > 1:
        torch_dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if on_gpu() else torch.device("cpu")


def device_description() -> str:
    """What rank 0 runs on, for the start-of-run log line."""
    if on_gpu():
        return f"{torch.cuda.get_device_name(device())} (cuda, {torch.cuda.device_count()} visible per process)"
    return f"CPU (DeepSpeed's CPU accelerator, {torch.get_num_threads()} threads per process)"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a (small, detached) tensor; returns a new tensor."""
    out = tensor.detach().to(device(), copy=True)
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().to(device(), copy=True)
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
    return out.to(tensor.device)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[world, *shape]: every rank's tensor (all of the same shape), in rank order."""
    local = tensor.detach().to(device(), copy=True)
    if not (torch_dist.is_initialized() and world_size() > 1):
        return local.unsqueeze(0).to(tensor.device)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    torch_dist.all_gather(parts, local)
    return torch.stack(parts).to(tensor.device)


REDUCTIONS = ("sum", "max", "first")


def read_once(entries: list[tuple[str, str, torch.Tensor | float]]) -> dict[str, float]:
    """Every rank's values of `entries` (name, reduction, a scalar tensor on this rank's device or a
    host number), reduced over ranks and read into the host in one go: one all-gather and one read,
    the only point of a step where the host waits for the device. `sum` adds the ranks' values in
    rank order in float64 (the same result on every rank, whatever the world size's grouping),
    `max` takes the largest, `first` rank 0's (for values every rank computed alike)."""
    dev = device()
    parts = []
    for name, how, value in entries:
        if how not in REDUCTIONS:
            raise ValueError(f"{name}: reduction {how!r} is not one of {REDUCTIONS}")
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().reshape(()).to(dev, torch.float64))
        else:  # a fill on the device, not a copy from the host (a copy would wait for the device)
            parts.append(torch.full((), float(value), dtype=torch.float64, device=dev))
    rows = all_gather(torch.stack(parts)).tolist()  # [world][entries]: the read
    out = {}
    for i, (name, how, _) in enumerate(entries):
        column = [row[i] for row in rows]
        if how == "sum":
            out[name] = sum(column)  # left to right: rank order, the same on every rank
        else:
            out[name] = max(column) if how == "max" else column[0]
    return out


def local_world_size() -> int:
    """Ranks on this machine: those whose hostname is this rank's."""
    import socket
    import zlib

    host = zlib.crc32(socket.gethostname().encode())
    hosts = all_gather(torch.tensor([host], dtype=torch.int64))
    return int((hosts == host).sum())


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when `flag` is true on all of them."""
    return not any_rank(not flag)


def copy_full_params(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """target's parameters := source's full values. Under ZeRO-3 each parameter is gathered in
    turn (collective: every rank calls this), so the peak is the copy plus one parameter."""
    import deepspeed

    targets = dict(target.named_parameters())
    sources = dict(source.named_parameters())
    if targets.keys() != sources.keys():
        raise RuntimeError(f"parameter names differ: {sorted(set(targets) ^ set(sources))[:5]}")
    for name, param in sources.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            targets[name].data.copy_(param.data)
