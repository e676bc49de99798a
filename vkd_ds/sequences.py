"""Which sequence each position of a batch belongs to, and the per-sequence reductions over it.

Every term, the saliency and the valence weights are per sequence (docs/objective.md). Unpacked, sequence b
is row b of the batch; packed (`data.packing`), a row holds several documents one after another and
each keeps its own sums and means: a reduction here never mixes two of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sequences:
    count: int  # sequences in the batch
    seq_len: int  # positions per row
    index: torch.Tensor | None = None  # [R,S] long: each position's sequence, -1 on padding; None: row b is sequence b

    @classmethod
    def by_rows(cls, mask: torch.Tensor) -> Sequences:
        return cls(mask.shape[0], mask.shape[1])

    @classmethod
    def of(cls, mask: torch.Tensor, sequences: Sequences | None) -> Sequences:
        """`sequences`, or one sequence per row of `mask` when it is None (an unpacked batch)."""
        return cls.by_rows(mask) if sequences is None else sequences

    @classmethod
    def of_batch(cls, batch: dict) -> Sequences:
        """A collated batch's: packed batches carry `sequence` ([R,S]) and one `row` key per sequence."""
        if "sequence" not in batch:
            return cls.by_rows(batch["input_ids"])
        return cls(int(batch["row"].shape[0]), int(batch["input_ids"].shape[1]), batch["sequence"])

    @property
    def packed(self) -> bool:
        return self.index is not None

    def of_positions(self, flat_index: torch.Tensor) -> torch.Tensor:
        """The sequence of each flat position [N] (positions of a row-major [R,S] batch)."""
        if self.index is None:
            return torch.div(flat_index, self.seq_len, rounding_mode="floor")
        return self.index.flatten()[flat_index]

    def sum_selected(self, values: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """[N] values at flat positions (with a trailing feature dim or not) -> [count] (or [count, H]) sums."""
        out = values.new_zeros((self.count, *values.shape[1:]))
        return out.index_add(0, self.of_positions(flat_index), values)

    def mean_selected(self, values: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Mean of each sequence's values at the selected positions; 0 for a sequence with none."""
        counts = self.counts(flat_index).to(values.dtype)
        counts = counts.view(-1, *([1] * (values.dim() - 1)))
        return self.sum_selected(values, flat_index) / counts.clamp(min=1.0)

    def counts(self, flat_index: torch.Tensor) -> torch.Tensor:
        """[count] how many of the selected positions each sequence holds."""
        return torch.bincount(self.of_positions(flat_index), minlength=self.count)

    def mean(self, per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """per_position [R,S] (or [R,S,H]) -> [count] (or [count,H]): mean over each sequence's valid positions."""
        if self.index is None:  # the plain per-row reduction, as before packing
            weights = mask.to(per_position.dtype)
            if per_position.dim() == 3:
                weights = weights.unsqueeze(-1)
            return (per_position * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        flat_index = selected(mask)
        return self.mean_selected(per_position.flatten(0, 1)[flat_index], flat_index)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """[count] bool: the sequences with at least one valid position."""
        if self.index is None:
            return mask.any(1)
        return self.counts(selected(mask)) > 0


def selected(mask: torch.Tensor) -> torch.Tensor:
    """The flat (row-major) indices of the valid positions of `mask` [R,S]: the ones `on_device`
    found on the host for a batch's next-token mask, else found here (`nonzero`: on a GPU the host
    waits for the device to get there)."""
    found = getattr(mask, HOST_SELECTED, None)
    return found if found is not None else mask.flatten().nonzero(as_tuple=True)[0]


# Attributes of a batch's device tensors, set by `on_device` (a tensor is a Python object; these go
# with it, and with nothing derived from it).
HOST_SHIFTED = "_vkd_next_token"  # on loss_mask: (targets, mask) of losses.shift_for_next_token
HOST_SELECTED = "_vkd_selected"  # on that mask: `selected(mask)`


def next_token(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) aligned with positions: position t predicts token t+1 when that token is a target."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    mask = torch.zeros_like(loss_mask)
    mask[:, :-1] = loss_mask[:, 1:]
    return targets, mask


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the device: a blocking copy to a
    GPU waits for every kernel queued before it, so the copy goes from pinned memory, asynchronously
    (PyTorch's pinned-memory cache keeps the source alive until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated host batch on `device`, with what every term reads from its loss mask worked out on
    the host, where reading the mask costs nothing: the next-token targets and mask, and the flat
    indices of the valid positions. On a GPU, finding those positions on the device (`nonzero`) makes
    the host wait for every kernel queued before it, and each term would do it again."""
    targets, mask = next_token(batch["input_ids"], batch["loss_mask"])
    index = selected(mask)
    moved = {key: to_device(value, device) for key, value in batch.items()}
    shifted = (to_device(targets, device), to_device(mask, device))
    setattr(shifted[1], HOST_SELECTED, to_device(index, device))
    setattr(moved["loss_mask"], HOST_SHIFTED, shifted)
    return moved


def model_inputs(batch: dict) -> dict:
    """A collated batch's arguments of a model forward. A packed batch gives each document positions
    from 0 and no attention mask: transformers then finds the documents from where the positions
    restart and attends within each only (block-diagonal masks for sdpa, eager and flex attention,
    varlen kernels for flash attention); `use_cache=False` is needed for that, as every forward here has."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": None, "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
