"""How many token rows a chunk of the vocabulary-wide terms holds: `loss.chunk_tokens`, and its
`auto` planned from the vocabulary, the device and the memory free at start."""

from __future__ import annotations

import torch

# `loss.chunk_tokens=auto` (plan_chunk_rows). On a CPU each fp32 [rows, vocab] buffer of a chunk stays
# at or under 16 MiB, well below glibc's largest mmap threshold (32 MiB, which vkd-ds fixes there,
# vkd_ds/malloc.py): such blocks stay in the heap and are reused chunk after chunk, where larger ones
# are mapped and page-faulted afresh each time (bench/soft_kd_memory.py --vocab 32768: 7.6 s -> 2.9 s;
# bench/chunk_tokens.py measures the choice against fixed sizes). On a GPU there is no
# such cliff, and every chunk costs a few dozen kernel launches: 512 MiB buffers keep a 152k
# vocabulary at 880 rows a chunk instead of 24 (tests/test_losses.py).
CPU_CHUNK_BYTES = 16 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20
# A chunk's working set is at most this share of the memory free when training starts.
CHUNK_MEMORY_SHARE = 0.125


def chunk_rows(chunk_tokens: int, vocab_size: int) -> int:
    """Rows per chunk: `loss.chunk_tokens`, resolved (an `auto` is planned once, at start: Objective.planned)."""
    if chunk_tokens is None:
        raise ValueError("loss.chunk_tokens=auto was never planned (Objective.planned)")
    return max(1, int(chunk_tokens))


def chunk_row_bytes(vocab_size: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes one row of a chunk needs at its peak: the row gathered in the logits' dtype, three fp32
    [vocab] buffers (its fp32 copy, the teacher's, one temporary; backward's gradient replaces one)
    and, with the fused LM head, its hidden state in fp32."""
    return vocab_size * (torch.empty((), dtype=dtype).element_size() + 3 * 4) + 4 * hidden


def plan_chunk_rows(
    vocab_size: int, hidden: int, dtype: torch.dtype, on_gpu: bool, free_bytes: int, fused: bool = False
) -> int:
    """`loss.chunk_tokens=auto`: the rows of a chunk, from the vocabulary, the hidden width, the logits'
    dtype, the device and the memory free at start. As many rows as keep one fp32 [rows, vocab]
    buffer within the device's chunk size (CPU_CHUNK_BYTES, GPU_CHUNK_BYTES) and the whole chunk
    within CHUNK_MEMORY_SHARE of the free memory; a multiple of 8 when over 8.

    `fused` (loss.fused_head): each chunk also multiplies by the whole [vocab, hidden] LM head, which
    a chunk of few rows spends its time reading. Where the CPU cap leaves fewer than
    FUSED_MIN_ROWS rows (vocabularies above 64k), the chunk is FUSED_ROWS rows instead, mapped
    afresh each time: at 151,936 that ran 1.6x faster than 24 rows (bench/chunk_tokens.py)."""
    cap = (GPU_CHUNK_BYTES if on_gpu else CPU_CHUNK_BYTES) // (4 * vocab_size)
    if fused and cap < FUSED_MIN_ROWS:
        cap = FUSED_ROWS
    budget = int(free_bytes * CHUNK_MEMORY_SHARE) // chunk_row_bytes(vocab_size, hidden, dtype)
    rows = max(1, min(cap, budget))
    return rows - rows % 8 if rows > 8 else rows


FUSED_MIN_ROWS = 64
FUSED_ROWS = 512
