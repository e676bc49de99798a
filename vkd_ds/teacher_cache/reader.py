"""Reading: the teacher as the cache serves it, from memory-mapped shards whose pages are released
once a batch is copied out."""

from __future__ import annotations

import functools
import mmap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vkd_ds.errors import VkdError
from vkd_ds.losses import SparseTeacher, shift_for_next_token
from vkd_ds.sequences import Sequences, selected
from vkd_ds.teacher_cache.shards import npy_header, shard_shapes
from vkd_ds.token_store import VALID_KEY_BASE

MAX_OPEN_SHARDS = 32  # mapped at once by a training process (about 6 file descriptors each)


class _Mapped:
    """One .npy file, memory-mapped read-only. `take` copies rows out; `release` drops the mapping's
    pages from this process (they stay in the page cache). The whole mapping is released, not the
    rows read: the kernel maps the pages around a faulting one too (fault-around), including pages
    of earlier batches, and an empty range costs the release next to nothing."""

    def __init__(self, path: Path):
        shape, self.dtype, self.offset = npy_header(path)
        self.shape = shape
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.ndarray(shape, self.dtype, buffer=self.map, offset=self.offset)

    def take(self, first: int, stop: int) -> np.ndarray:
        return np.array(self.array[first:stop])

    def take_at(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]  # a fancy index copies

    def release(self) -> None:
        self.map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None  # the view holds the mapping's buffer
        self.map.close()


class CachedTeacher:
    """Stands where the live teacher does: `on_batch(batch)` gives what the objective and the eval read
    of the teacher — logits as a SparseTeacher, the valence trajectory, the token entropy."""

    def __init__(self, directory: str | Path, manifest: dict, files: dict[str, tuple[str, list]], device):
        self.directory = Path(directory)
        self.manifest = manifest
        self.device = device
        self.temperature = float(manifest["temperature"])
        self.vocab_size = int(manifest["vocab_size"])
        self.has_valence = manifest["valence"] is not None
        self.folders: list[tuple[Path, dict]] = []  # every shard's directory and manifest entry
        self.offsets: list[np.ndarray] = []  # each shard's record offsets into its positions
        # A batch row's key (its token store row, valid rows from VALID_KEY_BASE on) gives its shard:
        # the cache's records are the store's rows in order, records_per_shard to a shard.
        self.first_shard: dict[int, int] = {}  # key base -> number of the split's first shard
        self.records_per_shard = int(manifest["records_per_shard"])
        # Shards are mapped when a batch needs them, at most MAX_OPEN_SHARDS at a time: every mapping
        # holds a file descriptor, and a large cache has thousands of files.
        self.open_shards: OrderedDict[int, dict[str, _Mapped]] = OrderedDict()
        for split, (_, examples) in files.items():
            self.first_shard[examples.key_base] = len(self.folders)
            for shard in manifest["splits"][split]["shards"]:
                folder = self.directory / split / shard["name"]
                self.folders.append((folder, shard))
                self.offsets.append(np.load(folder / "offsets.npy"))

    def _locate(self, key: int) -> tuple[int, int]:
        """(shard number, record within it) of a batch row's store key."""
        base = VALID_KEY_BASE if key >= VALID_KEY_BASE else 0
        if key < 0 or base not in self.first_shard:
            raise VkdError(f"teacher.cache ({self.directory}) has no entry for a row of this batch (not a data row)")
        shard, local = divmod(key - base, self.records_per_shard)
        return self.first_shard[base] + shard, local

    def _record(self, key: int, count: int, what: str, theirs: str) -> tuple[dict[str, _Mapped], int, int]:
        """The shard of a batch row's record (by its store key) and the record's first and end position in
        it; VkdError unless it holds `count` positions (`what`, as `theirs` counts them)."""
        number, record = self._locate(key)
        first, stop = int(self.offsets[number][record]), int(self.offsets[number][record + 1])
        if stop - first != count:
            where = f"teacher.cache ({self.directory})"
            raise VkdError(f"{where}: a record has {stop - first} cached {what}, {theirs} {count}")
        return self._shard(number), first, stop

    def _shard(self, number: int) -> dict[str, _Mapped]:
        if number in self.open_shards:
            self.open_shards.move_to_end(number)
            return self.open_shards[number]
        while len(self.open_shards) >= MAX_OPEN_SHARDS:
            for mapped in self.open_shards.popitem(last=False)[1].values():
                mapped.close()
        folder, shard = self.folders[number]
        names = [name for name in shard_shapes(shard, self.manifest) if name != "offsets"]
        self.open_shards[number] = {name: _Mapped(folder / f"{name}.npy") for name in names}
        return self.open_shards[number]

    def on_batch(self, batch: dict) -> dict:
        if "pairs_teacher" in batch:
            return self._on_batch_across_tokenizers(batch)
        _, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        keys = batch["row"].tolist()
        names = ("ids", "logp", "tail", "entropy", "target_logp", "valence")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        # One key per document: a packed row's documents, each with its own cached positions, in row order.
        counts = Sequences.of_batch(batch).counts(selected(mask)).tolist()
        touched: dict[int, _Mapped] = {}
        for b, key in enumerate(keys):
            if counts[b] == 0:
                continue  # nothing to look up (eval's padding rows have their mask emptied)
            shard, first, stop = self._record(int(key), counts[b], "positions", "the batch")
            for name in parts:
                if name in shard:
                    parts[name].append(shard[name].take(first, stop))
                    touched[id(shard[name])] = shard[name]
        for mapped in touched.values():
            mapped.release()
        dev = self.device
        k = self.manifest["top_k"]
        joined = functools.partial(_joined, parts, dev)
        sparse = SparseTeacher(joined("ids", k, torch.int64), joined("logp", k), joined("tail"), self.temperature)
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
        entropy[mask] = joined("entropy")
        out = {"logits": sparse, "entropy": entropy, "target_logp": joined("target_logp")}
        if self.has_valence:
            kv = self.manifest["valence"]["k"]
            valence = torch.zeros((*mask.shape, kv), dtype=torch.float32, device=dev)
            valence[mask] = joined("valence", kv)
            out["valence"] = valence
        return out

    def _on_batch_across_tokenizers(self, batch: dict) -> dict:
        """Across tokenizers the cache holds every teacher token of a record's teacher row (a position
        each, but the last); the batch's position pairs (cross_tokenizer.TeacherRows) say which of them
        the soft term compares: their rows, in the pairs' order, as one SparseTeacher."""
        pairs = batch["pairs_teacher"].cpu().numpy()
        lengths = (batch["teacher_attention_mask"].sum(1) - 1).clamp(min=0).tolist()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("ids", "logp", "tail")}
        touched: dict[int, _Mapped] = {}
        # The pairs come row by row, in row order: each row's are one run.
        rows, starts = np.unique(pairs[:, 0], return_index=True)
        for row, start, stop in zip(rows.tolist(), starts.tolist(), [*starts[1:].tolist(), len(pairs)], strict=True):
            key, theirs = int(batch["row"][row]), "the batch's teacher row (another teacher.tokenizer_path?)"
            shard, first, _ = self._record(key, lengths[row], "teacher positions", theirs)
            for name in parts:
                parts[name].append(shard[name].take_at(first + pairs[start:stop, 1]))
                touched[id(shard[name])] = shard[name]
        for mapped in touched.values():
            mapped.release()
        k = self.manifest["top_k"]
        joined = functools.partial(_joined, parts, self.device)
        return {
            "logits": SparseTeacher(joined("ids", k, torch.int64), joined("logp", k), joined("tail"), self.temperature)
        }


def _joined(parts: dict[str, list[np.ndarray]], device, name: str, width=None, dtype=torch.float32) -> torch.Tensor:
    """The rows read of one array, concatenated, in `dtype` on `device` (an empty tensor for none)."""
    if parts[name]:
        wide = np.int64 if dtype == torch.int64 else np.float32
        return torch.from_numpy(np.concatenate(parts[name]).astype(wide)).to(device, dtype)
    shape = (0,) if width is None else (0, width)
    return torch.zeros(shape, dtype=dtype, device=device)
