"""Reading a store: its manifest checked, its rows as Examples read with pread, a split's store
found, prepared or waited for."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vkd_ds.corpus import Source, resolve_sources, source_name
from vkd_ds.data import Example, row_mask
from vkd_ds.errors import VkdError
from vkd_ds.token_store.layout import (
    FORMAT,
    MANIFEST,
    ROW_DTYPE,
    VALID_KEY_BASE,
    default_store_dir,
    describe_notes,
    tokenizer_fingerprint,
)
from vkd_ds.token_store.writer import prepare_store

FORMAT_NAME = FORMAT.rsplit(" v", 1)[0]  # "vkd-ds token store", whatever the version


def is_store(path) -> bool:
    if not isinstance(path, str):
        return False
    p = Path(os.path.expanduser(path))
    manifest = p / MANIFEST
    if not manifest.is_file():
        return False
    try:
        # Any version: read_store_manifest refuses another one with what to do.
        return str(json.loads(manifest.read_text()).get("format", "")).startswith(FORMAT_NAME)
    except (OSError, ValueError):
        return False


def read_store_manifest(folder: Path, key: str) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VkdError(f"{key}: cannot read the token store's manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(FORMAT_NAME):
        raise VkdError(f"{key}: {path} is not a vkd-ds token store manifest (no {FORMAT!r})")
    if manifest["format"] != FORMAT:
        raise VkdError(
            f"{key}: the token store {folder} was prepared by another vkd-ds ({manifest['format']!r}, this one "
            f"reads {FORMAT!r}); prepare it again from its inputs (vkd-ds prepare-data)"
        )
    for name, entry in manifest["arrays"].items():
        file = folder / f"{name}.bin"
        size = file.stat().st_size if file.is_file() else None
        if size != entry["bytes"]:
            state = "is missing" if size is None else f"holds {size:,} bytes"
            raise VkdError(
                f"{key}: the token store {folder} is damaged: {file.name} {state}, its manifest says "
                f"{entry['bytes']:,}; delete {folder} and prepare it again (vkd-ds prepare-data)"
            )
    return manifest


class TokenRows(Sequence):
    """A store's rows as `vkd_ds.data.Example`s, each read from disk when asked for (os.pread).

    `key_base` is added to each row's index in `Example.index`: what distinguishes the rows of
    the training and held-out stores where both meet (the teacher cache's lookup)."""

    def __init__(self, folder: Path, manifest: dict, key_base: int = 0, sources: list[Source] | None = None):
        self.folder = folder
        self.manifest = manifest
        self.key_base = key_base
        self.fingerprint = manifest["fingerprint"]
        self.token_dtype = np.dtype(manifest["token_dtype"])
        self.num_rows = manifest["counts"]["rows"]
        self.files = manifest["files"]  # each input's path and kind (how its rows name their records)
        self.sources = sources
        self._fds: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(self.folder / f"{name}.bin", os.O_RDONLY)
        return self._fds[name]

    def _read(self, name: str, dtype: np.dtype, first: int, count: int) -> np.ndarray:
        size = dtype.itemsize * count
        data = os.pread(self._fd(name), size, dtype.itemsize * first)
        if len(data) != size:
            raise VkdError(f"the token store {self.folder} is damaged: {name}.bin ends early (prepare it again)")
        return np.frombuffer(data, dtype=dtype)

    def __len__(self) -> int:
        return self.num_rows

    def lengths(self) -> np.ndarray:
        """Every row's length in tokens (what packing plans from), read in blocks of rows.bin."""
        out = np.empty(self.num_rows, dtype=np.int64)
        block = 1 << 20
        for first in range(0, self.num_rows, block):
            count = min(block, self.num_rows - first)
            out[first : first + count] = self._read("rows", ROW_DTYPE, first, count)["length"]
        return out

    def row(self, index: int) -> np.void:
        return self._read("rows", ROW_DTYPE, index, 1)[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        r = self.row(index)
        length, target_from = int(r["length"]), int(r["target_from"])
        ids = self._read("tokens", self.token_dtype, int(r["start"]), length).tolist()
        if r["tstart"] >= 0:  # a conversation's row: its assistant turns, flagged token by token
            mask = self._read("targets", np.dtype("u1"), int(r["tstart"]), length).tolist()
        else:
            mask = row_mask(length, target_from)
        valence = None
        if r["vstart"] >= 0:
            valence = self._read("valence", np.dtype("<f4"), int(r["vstart"]), length).tolist()
        entry = self.files[r["file"]]
        where = source_name(entry["path"], entry["kind"], int(r["number"]))
        if r["window"]:
            where += f" (window {int(r['window']) + 1})"
        prompt_len = int(r["prompt_len"]) or None
        return Example(ids, mask, where, valence, prompt_len, self.key_base + index)

    def summary(self, split: str) -> str:
        """The start-up log's line for this split: what the store holds, and where it is."""
        c = self.manifest["counts"]
        windowed = f" ({c['windowed_records']:,} split into windows)" if c["windowed_records"] else ""
        text = (
            f"{split}: {c['records']:,} records{windowed} -> {c['rows']:,} rows of <= {self.manifest['max_seq_len']} "
            f"tokens, {c['tokens']:,} tokens ({c['targets']:,} targets) from {len(self.files)} file(s); "
            f"token store {self.folder}"
        )
        mixture = self.mixture()
        if mixture:
            total = sum(w for _, _, w in mixture)
            parts = [f"{s.spec} {w / total:.3g}" for s, (_, _, w) in zip(self.sources, mixture, strict=True)]
            text += "; mixture " + ", ".join(parts)
        return text

    def notes(self) -> list[str]:
        return [f"{self.folder}: {note}" for note in describe_notes(self.manifest["counts"])]

    @property
    def text_rows(self) -> int:
        return int(self.manifest["counts"]["text_rows"])

    @property
    def has_conversations(self) -> bool:
        """Some rows are `messages` records rendered by the chat template (only they store per-token targets)."""
        return "targets" in self.manifest["arrays"]

    def mixture(self) -> list[tuple[int, int, float]] | None:
        """[(first row, stop row, weight)] of each weighted source; None where no source is weighted."""
        if not self.sources or all(s.weight is None for s in self.sources):
            return None
        ranges, at = [], 0
        rows = [entry["rows"] for entry in self.files]
        for source in self.sources:
            first = rows[at][0]
            stop = rows[at + len(source.files) - 1][1]
            at += len(source.files)
            ranges.append((first, stop, float(source.weight)))
        return ranges

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit os may be gone
            pass


def open_split(
    value,
    key: str,
    tokenizer,
    max_seq_len: int,
    store_dir: str | None,
    *,
    key_base: int = 0,
    wait: bool = False,
    tokenizer_sha256: str | None = None,
    assistant_turns: str = "all",
) -> TokenRows:
    """A split's rows: `value` is a prepared store's directory, or the inputs (prepared here once,
    or, with `wait`, by the job's rank 0). `tokenizer_sha256`: the tokenizer's fingerprint, if known."""
    tokenizer_sha256 = tokenizer_sha256 or tokenizer_fingerprint(tokenizer)
    if is_store(value):
        folder = Path(os.path.expanduser(value))
        manifest = read_store_manifest(folder, key)
        if manifest["made_from"]["tokenizer_sha256"] != tokenizer_sha256:
            raise VkdError(
                f"{key}: the token store {folder} was prepared with another tokenizer than data.tokenizer_path "
                f"({getattr(tokenizer, 'name_or_path', '?')}); prepare it again with this one (vkd-ds prepare-data)"
            )
        if manifest["max_seq_len"] != max_seq_len:
            raise VkdError(
                f"{key}: the token store {folder} was prepared with data.max_seq_len={manifest['max_seq_len']}, "
                f"this run has {max_seq_len}; prepare it again (vkd-ds prepare-data)"
            )
        made_with = manifest["made_from"].get("assistant_turns", "all")
        if "targets" in manifest["arrays"] and made_with != assistant_turns:
            raise VkdError(
                f"{key}: the token store {folder} was prepared with data.assistant_turns={made_with}, "
                f"this run has {assistant_turns}; prepare it again (vkd-ds prepare-data)"
            )
        return TokenRows(folder, manifest, key_base)
    sources = resolve_sources(value, key)
    root = Path(os.path.expanduser(store_dir)) if store_dir else default_store_dir()
    folder = prepare_store(
        root,
        sources,
        tokenizer,
        max_seq_len,
        wait=wait,
        key=key,
        tokenizer_sha256=tokenizer_sha256,
        assistant_turns=assistant_turns,
    )
    manifest = read_store_manifest(folder, key)
    return TokenRows(folder, manifest, key_base, sources)


def open_splits(data, tokenizer) -> dict[str, tuple[object, TokenRows]]:
    """{split: (the config's value, its rows)} of data.train_path and data.valid_path (if set), from
    the settings' `data` section."""
    wait = waits_for_rank_zero()
    tokenizer_sha256 = tokenizer_fingerprint(tokenizer)  # the whole tokenizer's JSON: hashed once
    splits = {}
    for split, value, base in (("train", data.train_path, 0), ("valid", data.valid_path, VALID_KEY_BASE)):
        if value is not None:
            key = f"data.{split}_path"
            rows = open_split(
                value,
                key,
                tokenizer,
                data.max_seq_len,
                data.store_dir,
                key_base=base,
                wait=wait,
                tokenizer_sha256=tokenizer_sha256,
                assistant_turns=data.assistant_turns,
            )
            splits[split] = (value, rows)
    return splits


def waits_for_rank_zero() -> bool:
    """A rank of a launched job other than rank 0 waits for rank 0's preparation (the launcher's
    `vkd-ds train` prepares before it starts any rank; SLURM and the bare launcher do not)."""
    return int(os.environ.get("RANK", "0") or 0) != 0
