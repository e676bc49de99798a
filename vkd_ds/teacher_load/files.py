"""Which files of a checkpoint directory hold the weights: what transformers' `from_pretrained` takes
from a local directory, in its order of preference: `model.safetensors`, `model.safetensors.index.json`
(sharded), `pytorch_model.bin`, `pytorch_model.bin.index.json` (sharded)."""

from __future__ import annotations

import json
from pathlib import Path

from vkd_ds.errors import VkdError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
NO_WEIGHTS = f"holds no weights transformers loads: none of {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE}, {BIN_INDEX_FILE}"


def _weight_files(directory: Path, single: str, index_name: str) -> list[Path]:
    """One format's files, as transformers finds them: the single file first, else its index's shards."""
    if (directory / single).is_file():
        return [directory / single]
    index = directory / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VkdError(f"teacher.path: {index} is not a checkpoint index ({err})") from None
    files = [directory / name for name in names]
    for file in files:
        if not file.is_file():
            raise VkdError(f"teacher.path: {index} names {file.name}, which is missing")
    return files


def safetensors_files(directory: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (one file, or the shards its index names); [] for none."""
    return _weight_files(Path(directory), SINGLE_FILE, INDEX_FILE)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The files transformers would load the weights from: safetensors where there are any, else
    `.bin` (one file or the shards of its index); [] for neither."""
    return safetensors_files(directory) or _weight_files(Path(directory), BIN_FILE, BIN_INDEX_FILE)
