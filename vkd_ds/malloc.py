"""Host allocator settings for CPU training under glibc.

Every step allocates and frees the same large tensors (activations, logits chunks, gradients).
glibc serves each block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap that
is page-faulted on first touch and unmapped on free, and trims the heap top back to the kernel,
to be faulted in again next step (README, "Against a hand-written PyTorch loop"). Fixing the
threshold at 32 MiB and never trimming keeps freed memory in the heap for the next step; the
resident set stays near the peak instead of falling between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
LOADING_MMAP_THRESHOLD = 128 * 2**10  # glibc's initial (dynamic) threshold, held fixed


def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def keep_freed_memory() -> bool:
    """Tune glibc as above; False (and nothing changed) where the C library is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """For the teacher's load, before `keep_freed_memory`: building under zero.Init allocates each
    parameter whole, partitions it and frees the whole. Under glibc's dynamic threshold those
    blocks end up in the heap, whose holes the next, differently sized ones do not fit: one rank
    of tests/test_teacher_load.py peaked 150 MB (two thirds of its share) above its share. A fixed
    threshold of 128 KiB maps every such block and unmaps it on free. False where not glibc."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD))
