"""Host allocator settings for CPU training under glibc.

Every step allocates and frees the same large tensors (activations, logits chunks, gradients).
glibc serves each block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap that
is page-faulted on first touch and unmapped on free, and trims the heap top back to the kernel,
to be faulted in again next step (bench/README.md, "plain_kd.py"). Fixing the
threshold at 32 MiB and never trimming keeps freed memory in the heap for the next step; the
resident set stays near the peak instead of falling between steps.
"""

from __future__ import annotations

import contextlib
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


_kept = False  # keep_freed_memory() is in force: teacher_phase() may lower the threshold for a while


def keep_freed_memory() -> bool:
    """Tune glibc as above; False (and nothing changed) where the C library is not glibc."""
    global _kept
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


@contextlib.contextmanager
def teacher_phase():
    """While the ZeRO-3 teacher runs, under `keep_freed_memory`: each layer's gathered weights (up to
    tens of MiB, in a dozen sizes) are allocated and freed once per forward. Kept in the heap they
    fragment it and the resident set grows step after step (bench/teacher_forward_memory.py, a 1.1 B
    teacher on 2 ranks: peak 3.86 GB after 3 forwards kept, 3.33 GB mapped, at about 6 % more time
    a forward, 10.1 s against 9.5). So the threshold
    drops to LOADING_MMAP_THRESHOLD for the teacher's forward and is restored after: those blocks are
    mapped and unmapped, and the loss's chunks still reuse the heap. A no-op otherwise."""
    if not _kept:
        yield
        return
    mallopt = _mallopt()
    mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)


def return_freed_memory() -> bool:
    """For the teacher's load, before `keep_freed_memory`: building under zero.Init allocates each
    parameter whole, partitions it and frees the whole. Under glibc's dynamic threshold those
    blocks end up in the heap, whose holes the next, differently sized ones do not fit
    (bench/teacher_load_peak.py, glibc's defaults, a 1.1 B teacher: one rank peaked 3.06-3.24 GB
    against the other's 2.73-2.80; with this, in training, 2.92 GB: bench/large_teacher.py). A fixed
    threshold of 128 KiB maps every such block and unmaps it on free. False where not glibc."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD))
