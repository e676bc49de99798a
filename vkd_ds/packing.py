"""Packed rows (`data.packing`): several documents per row of data.max_seq_len tokens, so that a
micro-batch spends its compute on tokens rather than padding.

The store's rows (documents: records, or windows of long ones) are packed once, at start, by best-fit
decreasing (the longest document first, each into the row it fills best). The packs are fixed for the
run; the sampler draws packs as it drew rows, so resumption, mixtures and the N-ranks = one-rank
equivalence work as before. What happens inside a packed row is documents that never see each
other: positions restart per document and attention stays within it (sequences.model_inputs), and
every per-sequence quantity is reduced per document (vkd_ds.sequences).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vkd_ds.data import Example


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of `lengths` (each <= capacity) into rows of at most `capacity` tokens.

    Returns (members, offsets): row j holds documents members[offsets[j]:offsets[j+1]], in their
    original order. Deterministic. The rows with room left are kept by how much room they have; a
    Python int is the bit set of the room sizes some row has, so the best fit (the least room that
    takes the document) is one shift and a lowest-bit lookup."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit rows of {capacity}")
    row_of = np.empty(lengths.size, dtype=np.int64)
    by_room: dict[int, list[int]] = {}  # room left -> rows with exactly that much
    rooms = 0  # bit r set: some row has r tokens of room
    rows = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        fits = rooms >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            stack = by_room[room]
            row = stack.pop()
            if not stack:
                rooms &= ~(1 << room)
            left = room - n
        else:
            row, rows = rows, rows + 1
            left = capacity - n
        row_of[i] = row
        if left > 0:
            by_room.setdefault(left, []).append(row)
            rooms |= 1 << left
    members = np.argsort(row_of, kind="stable")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=offsets[1:])
    return members, offsets


class PackedRows(Sequence):
    """A token store's rows packed into rows of `capacity` tokens: item j is the list of Examples
    (documents) of packed row j. Packs never mix two sources of a mixture, whose weights then
    apply to packed rows (about tokens) rather than documents."""

    def __init__(self, rows, capacity: int, lengths: np.ndarray | None = None):
        """`lengths`: the rows' lengths where the caller has read them already."""
        self.rows = rows
        self.capacity = capacity
        self.fingerprint = rows.fingerprint
        lengths = rows.lengths() if lengths is None else lengths
        self.tokens = int(lengths.sum())
        mixture = rows.mixture()
        groups = mixture or [(0, len(rows), 1.0)]
        members, offsets, self._mixture = [], [np.zeros(1, dtype=np.int64)], []
        packs = 0
        for first, stop, weight in groups:
            m, o = best_fit_decreasing(lengths[first:stop], capacity)
            self._mixture.append((packs, packs + len(o) - 1, weight))
            packs += len(o) - 1
            members.append(m + first)
            offsets.append(o[1:] + offsets[-1][-1])
        self.members = np.concatenate(members)
        self.offsets = np.concatenate(offsets)
        self.weighted = mixture is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        """Documents per packed row."""
        return np.diff(self.offsets)

    def __getitem__(self, index: int) -> list[Example]:
        first, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return [self.rows[int(i)] for i in self.members[first:stop]]

    def mixture(self) -> list[tuple[int, int, float]] | None:
        return self._mixture if self.weighted else None

    def fill(self) -> float:
        """Real tokens over the tokens of all packed rows."""
        return self.tokens / max(len(self) * self.capacity, 1)

    def summary(self) -> str:
        return (
            f"packing: {len(self.rows):,} documents into {len(self):,} rows of {self.capacity} tokens "
            f"({len(self.rows) / max(len(self), 1):.2f} per row, rows {self.fill():.1%} full)"
        )


AUTO_FILL = 0.9  # data.packing=auto packs when rows are on average shorter than this share of a row


def packed_rows(setting, rows, max_seq_len: int, pack_length: int | None = None) -> PackedRows | None:
    """The training rows packed into rows of `pack_length` tokens (None: max_seq_len), or None:
    `data.packing` true, false, or auto (packs when the rows' mean length is under AUTO_FILL of
    data.max_seq_len, where padding to the longest row would waste a tenth or more)."""
    if setting is False or len(rows) == 0:
        return None
    lengths = rows.lengths()  # one pass over rows.bin, for the decision and the packing
    if setting == "auto" and lengths.mean() >= AUTO_FILL * max_seq_len:
        return None
    return PackedRows(rows, pack_length or max_seq_len, lengths)


@torch.no_grad()
def leaks_across_documents(forward, vocab_size: int, device) -> float:
    """How far a document's logits move when another document precedes it in a packed row (relative to
    their size; ~1e-6 in fp32 when attention stays within documents, of order 1 when it does not).
    Two rows, as a micro-batch has: transformers' flash-attention path finds packed documents only in
    a batch of one row. `forward(batch)` gives logits [R,S,V]. Collective under ZeRO-3: every rank calls it."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, vocab_size, (2, 7), generator=generator).tolist()
    first = first[:6]
    packed = {
        "input_ids": torch.tensor([first + second, second + first], device=device),
        "attention_mask": None,
        "position_ids": torch.tensor([list(range(6)) + list(range(7)), list(range(7)) + list(range(6))], device=device),
    }
    alone = {"input_ids": torch.tensor([second], device=device), "attention_mask": torch.ones(1, 7, device=device)}
    together = forward(packed)[0, 6:].float()
    reference = forward(alone)[0].float()
    return float((together - reference).abs().max() / reference.abs().max().clamp(min=1e-6))
