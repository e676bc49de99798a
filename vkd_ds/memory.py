"""This process's resident set, now and at its peak since a reset (Linux /proc)."""

from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    """Resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_host_bytes() -> int:
    """MemAvailable of this machine (the kernel's estimate of what can be allocated without swap)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_device_bytes(on_gpu: bool, local_ranks: int) -> int:
    """Memory free to this rank now: its GPU's free memory, or its part of this machine's available
    host memory (shared by its `local_ranks` ranks)."""
    if on_gpu:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    return available_host_bytes() // max(1, local_ranks)
