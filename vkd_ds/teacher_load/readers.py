"""Element ranges of one checkpoint tensor, read out of its file. safetensors files are read with
plain reads, not mmap, so no file page stays in a rank's resident set. A `.bin` file is opened with
`torch.load(mmap=True, weights_only=True)`, one file at a time: only the pages of the slices read are
touched, each slice is copied out and the mapping is dropped when the file is done (a pre-torch-1.6
`.bin`, not a zip archive, cannot be mapped: that one file is read whole, as transformers reads it)."""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import torch

from vkd_ds.errors import VkdError, library_reason

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads element ranges of the tensors in one safetensors file with plain reads, not mmap: the
    bytes land in a buffer this process owns and frees, and no mapped page of the file stays
    counted in its resident set (the format: 8-byte header length, JSON header, raw data)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            (length,) = struct.unpack("<Q", self.handle.read(8))
            header = json.loads(self.handle.read(length))
        except (struct.error, ValueError) as err:
            self.handle.close()
            raise VkdError(f"teacher.path: {path.name} is not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.handle.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype | None:
        """Its stored dtype; None for one vkd-ds cannot read (refused by `read`; `stored_dtype` names it)."""
        return _DTYPES.get(self.entries[key]["dtype"])

    def stored_dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key`, as a 1-D tensor of its stored dtype."""
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise VkdError(
                f"teacher.path: {self.path.name} stores {key!r} as {entry['dtype']}, which vkd-ds cannot read"
            )
        dtype = _DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        end = math.prod(entry["shape"]) if end is None else end
        first, _ = entry["data_offsets"]
        buffer = torch.empty((end - start) * size, dtype=torch.uint8)
        self.handle.seek(self.data_start + first + start * size)
        if self.handle.readinto(buffer.numpy()) != buffer.numel():
            raise VkdError(f"teacher.path: {self.path.name} is truncated (reading {key!r})")
        return buffer.view(dtype)


class TorchBinReader:
    """The same reads from one `.bin` file (a torch.save'd state dict), through `torch.load(mmap=True,
    weights_only=True)`: the file is mapped, not read; `read` copies out only the slice asked for (so
    only its pages are touched) and `close` drops the mapping. With `headers_only` the tensors are
    unpickled onto the meta device: names, shapes and dtypes, no data."""

    def __init__(self, path: Path, headers_only: bool = False):
        self.path = path
        try:
            if headers_only:
                state = torch.load(path, map_location="meta", weights_only=True)
            else:  # a pre-torch-1.6 file is not a zip archive and cannot be mapped: read whole, as transformers does
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # not a torch file, or pickled objects weights_only refuses
            raise VkdError(f"teacher.path: torch.load cannot read {path.name}: {library_reason(err)}") from None
        if not isinstance(state, dict):
            raise VkdError(f"teacher.path: {path.name} holds a {type(state).__name__}, not a state dict")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise VkdError(f"teacher.path: {path.name} holds {key!r}, a {type(value).__name__}, not a tensor")
        self.tensors: dict[str, torch.Tensor] = dict(state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.tensors = {}  # the last reference to the mapped storages: unmapped here

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> list[int]:
        return list(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key`, as a 1-D tensor of its stored dtype
        that owns its memory (a copy of those elements only, unless the stored tensor is a
        non-contiguous view, which is flattened whole first)."""
        tensor = self.tensors[key]
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
        return flat[start:end].clone()


def open_checkpoint(path: Path, headers_only: bool = False) -> SafetensorsReader | TorchBinReader:
    """A reader of one checkpoint file, by its format (safetensors reads only its header when opened)."""
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return TorchBinReader(path, headers_only=headers_only)
