"""The inputs users have, read as one stream of (where, record) pairs.

`data.train_path` (and `data.valid_path`) is one input or a list of them; each input is a path or a
glob, or `{path: ..., weight: ...}` to weight it in a mixture. A file is read by its kind:

- `.jsonl` / `.json`: one JSON object per line (`where` = file:line);
- `.parquet`: Parquet, its columns named as JSONL's keys (`where` = file:row, 1-based);
- a directory written by `datasets.save_to_disk` (its Arrow files, `where` = dir:row);
- anything else (`.txt`, `.md`, source files): the whole file is one `text` document (`where` = file).

A record is `{"text": ...}` or `{"prompt": ..., "completion": ...}`, with an optional `"valence"`
(see vkd_ds.data). Every file is checked as it is read; the first bad record ends the reading with
one VkdError naming its file and line (or row).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vkd_ds.data import Example, check_record, is_empty, tokenize
from vkd_ds.errors import VkdError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_KEYS = ("text",)
PAIR_KEYS = ("prompt", "completion")
RECORD_BATCH = 1024  # rows per Arrow/Parquet record batch read


@dataclass(frozen=True)
class Source:
    """One input of a split as the config gives it: a path or glob, the files it names (in order),
    and its mixture weight (None: its rows are drawn in proportion to their number)."""

    spec: str
    files: tuple[str, ...]
    weight: float | None = None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def is_arrow_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (its `state.json` lists the Arrow files)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def resolve_sources(value, key: str) -> list[Source]:
    """`data.train_path`'s value (a string, or a list of strings and {path, weight} mappings) as
    sources with their files; VkdError for a missing file, a glob that matches nothing, a bad weight."""
    listed = isinstance(value, (list, tuple))
    entries = list(value) if listed else [value]
    if not entries:
        raise VkdError(f"config key `{key}` is an empty list: name at least one data file")
    sources = []
    for j, entry in enumerate(entries):
        where = f"{key}[{j}]" if listed else key
        weight = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "weight"}
            if "path" not in entry or unknown:
                raise VkdError(f"config key `{where}` must be a path or {{path: ..., weight: ...}}, got {entry!r}")
            weight = entry.get("weight")
            entry = entry["path"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise VkdError(f"config key `{where}.weight` must be a number > 0, got {weight!r}")
            weight = float(weight)
        if not isinstance(entry, str) or not entry:
            raise VkdError(f"config key `{where}` must be a path or a glob, got {entry!r}")
        sources.append(Source(entry, _files_of(entry, where), weight))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise VkdError(f"config key `{key}`: give every input a weight, or none (mixture weights are relative)")
    return sources


def _files_of(spec: str, where: str) -> tuple[str, ...]:
    expanded = os.path.expanduser(spec)
    if _has_glob(expanded):
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if Path(p).is_file() or is_arrow_dir(Path(p)))
        if not matches:
            raise VkdError(f"config key `{where}`: the glob {spec!r} matches no file")
        return tuple(matches)
    path = Path(expanded)
    if not path.exists():
        raise VkdError(f"data file not found: {spec} ({where})")
    if path.is_dir() and (path / "manifest.json").is_file():
        raise VkdError(
            f"{spec} ({where}) is a token store: give it alone as {where.split('[')[0]}, not in a list "
            "(a store is already one split's data)"
        )
    if path.is_dir() and not is_arrow_dir(path):
        if (path / "dataset_dict.json").is_file():
            raise VkdError(f"{spec} ({where}) holds a DatasetDict: name one split's directory (e.g. {path / 'train'})")
        raise VkdError(
            f"{spec} ({where}) is a directory, neither a `datasets.save_to_disk` dataset nor a vkd-ds token store: "
            f"give its files with a glob (e.g. '{path}/**/*.jsonl')"
        )
    return (str(path),)


def file_kind(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "arrow"
    name = p.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def read_records(path: str) -> Iterator[tuple[int, dict, float]]:
    """(line or row, record, fraction of the file read) of one input file, each record checked."""
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _jsonl(Path(path))
    elif kind == "parquet":
        yield from _parquet(Path(path))
    elif kind == "arrow":
        yield from _arrow_dir(Path(path))
    else:
        yield from _text_file(Path(path))


def _jsonl(path: Path) -> Iterator[tuple[int, dict, float]]:
    size, done = max(1, path.stat().st_size), 0
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            done += len(raw)
            where = f"{path}:{line_no}"
            try:
                # utf-8-sig on the first line: editors write a byte-order mark at the start of a file.
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise VkdError(f"{where}: not valid UTF-8 (byte {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VkdError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            check_record(record, where)
            yield line_no, record, done / size


def _columns_to_read(names: list[str], where: str) -> list[str]:
    if "text" in names:
        wanted = ["text"]
    elif all(k in names for k in PAIR_KEYS):
        wanted = list(PAIR_KEYS)
    elif "messages" in names:
        wanted = ["messages"]
    else:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise VkdError(f'{where}: no "text" column, nor "prompt" + "completion", nor "messages" (its columns: {shown})')
    return wanted + (["valence"] if "valence" in names else [])


def _table_records(batches, columns: list[str], where: str, rows: int) -> Iterator[tuple[int, dict, float]]:
    row = 0
    for batch in batches:
        values = {name: batch.column(name).to_pylist() for name in columns}
        for j in range(batch.num_rows):
            row += 1
            record = {name: values[name][j] for name in columns}
            if "valence" in record and record["valence"] is None:
                del record["valence"]  # a null label: an unlabelled record in a column with labels
            check_record(record, f"{where}:{row}")
            yield row, record, row / max(1, rows)


def _parquet(path: Path) -> Iterator[tuple[int, dict, float]]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for files that are not Parquet
        raise VkdError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    columns = _columns_to_read(handle.schema_arrow.names, str(path))
    batches = handle.iter_batches(batch_size=RECORD_BATCH, columns=columns)
    yield from _table_records(batches, columns, str(path), handle.metadata.num_rows)


def _arrow_dir(path: Path) -> Iterator[tuple[int, dict, float]]:
    import pyarrow as pa

    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VkdError(f"{path}: cannot read its state.json ({err})") from None
    tables = []
    for file in files:
        try:
            # save_to_disk writes Arrow's streaming format; memory-mapped, a table costs no copy.
            tables.append(pa.ipc.open_stream(pa.memory_map(str(file))).read_all())
        except Exception as err:  # pyarrow's own error types
            raise VkdError(f"{file}: not a readable Arrow file ({str(err).splitlines()[0]})") from None
    if not tables:
        raise VkdError(f"{path}: its state.json lists no Arrow file")
    columns = _columns_to_read(tables[0].schema.names, str(path))
    rows = sum(t.num_rows for t in tables)
    batches = (batch for table in tables for batch in table.to_batches(max_chunksize=RECORD_BATCH))
    yield from _table_records(batches, columns, str(path), rows)


def _text_file(path: Path) -> Iterator[tuple[int, dict, float]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise VkdError(f"{path}: not valid UTF-8 (byte {err.start + 1}); plain text inputs must be UTF-8") from None
    yield 1, {"text": text}, 1.0


def source_name(path: str, kind: str, number: int) -> str:
    """How a record is named in messages: file:line for JSONL, file:row for tables, the file for text."""
    return path if kind == "text" else f"{path}:{number}"


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """A small JSONL file's (file:line, record) pairs, in memory; one clear error for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise VkdError(f"data file not found: {path}")
    records = [(f"{path}:{line}", record) for line, record, _ in _jsonl(path)]
    if not records:
        raise VkdError(f"data file {path} holds no records")
    return records


def load_examples(path: str | Path, tokenizer, max_seq_len: int) -> list[Example]:
    """A small JSONL file's examples, in memory (tests, benches); records with empty text are skipped.
    Training reads a token store instead (vkd_ds.token_store), which applies the same rules."""
    return tokenize([(w, r) for w, r in read_jsonl(path) if not is_empty(r)], tokenizer, max_seq_len)
