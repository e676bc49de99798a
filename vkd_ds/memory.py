"""This process's resident set, now and at its peak since a reset (the peak from Linux /proc), and the
memory free to it."""

from __future__ import annotations

import os
import resource

import psutil

GIB = 2**30


def rss_bytes() -> int:
    """Resident set size now."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) to the current one: writing 5 to clear_refs (Linux >= 4.0).
    False where that is not allowed; the peak then counts from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set since the last `reset_peak_rss` (or the process's start)."""
    kib = _proc_kib("/proc/self/status", "VmHWM:")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_host_bytes() -> int:
    """MemAvailable of this machine (the kernel's estimate of what can be allocated without swap)."""
    kib = _proc_kib("/proc/meminfo", "MemAvailable:")
    return kib * 1024 if kib is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _proc_kib(path: str, field: str) -> int | None:
    """A `field: N kB` line of a /proc file, in KiB; None where there is none."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def free_device_bytes(on_gpu: bool, local_ranks: int) -> int:
    """Memory free to this rank now: its GPU's free memory, or its part of this machine's available
    host memory (shared by its `local_ranks` ranks)."""
    if on_gpu:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    return available_host_bytes() // max(1, local_ranks)
