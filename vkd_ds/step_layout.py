"""Which documents the micro-batches of a step hold, on every rank: the deterministic sampler's
draw of the global batch, this rank's share of it as device batches, and every rank's counts."""

from __future__ import annotations

import numpy as np
import torch

from vkd_ds import dist
from vkd_ds.cross_tokenizer import CrossVocab
from vkd_ds.data import Example, GlobalBatchSampler, collate, collate_packed
from vkd_ds.packing import PackedRows
from vkd_ds.sequences import on_device
from vkd_ds.token_store import TokenRows


class StepLayout:
    def __init__(
        self,
        train_data: TokenRows,
        packs: PackedRows | None,
        micro: int,
        accum: int,
        seed: int,
        pad_id: int,
        device: torch.device,
        cross: CrossVocab | None = None,
    ):
        """`packs`: the training rows packed (data.packing), which the sampler then draws instead of
        single rows. `micro`, `accum`, `seed`: trainer.micro_batch_size, grad_accum and seed. `cross`:
        the teacher's tokenizer, when it differs (each batch then carries its rows in the teacher's tokens)."""
        self.train_data, self.packs, self.cross = train_data, packs, cross
        self.micro, self.accum = micro, accum
        self.pad_id, self.device = pad_id, device
        self.world, self.rank = dist.world_size(), dist.rank()
        units = train_data if packs is None else packs
        self.sampler = GlobalBatchSampler(len(units), micro, accum, self.world, seed, units.mixture())
        # Documents in each packed row (1 each unpacked): what the per-document bookkeeping counts.
        self.pack_sizes = None if packs is None else packs.sizes()

    def documents(self, step: int, micro_step: int) -> tuple[list[Example], list[int] | None]:
        """This rank's documents of a micro-step, and how many of them each packed row holds (None unpacked)."""
        units = self.sampler.indices(step, micro_step, self.rank)
        if self.packs is None:
            return [self.train_data[i] for i in units], None
        packs = [self.packs[i] for i in units]
        return [doc for pack in packs for doc in pack], [len(pack) for pack in packs]

    def document_counts(self, step: int) -> np.ndarray:
        """[accum, world] documents of every rank's micro-batches of a step (the same on every rank:
        the sampler is deterministic), in the stream order (micro-step, rank) of the global batch.
        Host numbers (numpy): the step's bookkeeping reads them without touching the device."""
        accum, micro = self.accum, self.micro
        if self.pack_sizes is None:
            return np.full((accum, self.world), micro, dtype=np.int64)
        sizes = np.asarray(self.pack_sizes)
        return np.array(
            [[sizes[self.sampler.indices(step, a, r)].sum() for r in range(self.world)] for a in range(accum)],
            dtype=np.int64,
        )

    def first_document(self, counts: np.ndarray, micro_step: int) -> int:
        """The global-batch index of this rank's first document of a micro-step (it seeds the draws)."""
        return int(counts.flatten()[: micro_step * self.world + self.rank].sum())

    def batch(self, examples: list[Example], rows: list[int] | None) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id) if rows is None else collate_packed(examples, self.pad_id, rows)
        if self.cross is not None:
            batch |= self.cross.batch_fields([ex.input_ids for ex in examples], batch["loss_mask"])
        return on_device(batch, self.device)
