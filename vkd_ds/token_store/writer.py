"""Preparing a store: the inputs tokenized in batches on every core, written into a partial
directory and published by one rename; or, on a rank that is not rank 0, waiting for it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vkd_ds.checkpoint import write_atomic
from vkd_ds.corpus import Source, file_kind, read_records, source_name
from vkd_ds.data import Document, chat_document, document, is_empty, record_texts
from vkd_ds.errors import VkdError
from vkd_ds.token_store.layout import (
    FORMAT,
    MANIFEST,
    ROW_DTYPE,
    describe_notes,
    fingerprint,
    id_dtype,
    tokenizer_fingerprint,
)

ENCODE_CHARS = 1 << 22  # characters per encode_batch call: large enough to keep every core busy
PROGRESS_EVERY_S = 5.0
WAIT_FOR_WRITER_S = 300.0  # a waiting rank gives up when no preparation has shown progress for this long


@dataclass
class Counts:
    """What preparation kept, split and cut, for the manifest and the start-up log."""

    records: int = 0
    rows: int = 0
    tokens: int = 0  # stored
    targets: int = 0
    windowed_records: int = 0  # text documents split into several windows
    text_rows: int = 0  # rows whose prompt is their first seq_kd.prompt_tokens tokens
    labelled_rows: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> [count, first file:line]
    cut_tokens: int = 0  # tokens of prompt/completion pairs past max_seq_len

    def note(self, reason: str, where: str) -> None:
        entry = self.skipped.setdefault(reason, [0, where])
        entry[0] += 1


class _HashedFile:
    """A file written front to back, its SHA-256 and size kept as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = path.open("wb")
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return {"bytes": self.bytes, "sha256": self.digest.hexdigest()}


class _StoreWriter:
    def __init__(self, folder: Path, tokenizer, max_seq_len: int, assistant_turns: str = "all"):
        self.folder = folder
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.last_turn_only = assistant_turns == "last"
        self.dtype = id_dtype(len(tokenizer))
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.files = {name: _HashedFile(folder / f"{name}.bin") for name in ("tokens", "rows", "valence", "targets")}
        self.counts = Counts()
        self.rows: list[tuple] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer's batch call spreads a batch over every core; transformers' own __call__
        # does the same work with Python-side conversions on top.
        self.encode = (
            (lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)])
            if backend is not None and hasattr(backend, "encode_batch_fast")
            else (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
        )

    def add_batch(self, pending: list[tuple[int, int, str, dict]]) -> None:
        """Tokenize and store a batch of (file index, line, file:line, record)."""
        encoded = iter(self.encode([text for *_, record in pending for text in record_texts(record)]))
        for file_index, number, where, record in pending:
            if "messages" in record:  # rendered whole by the chat template, with character offsets
                doc = chat_document(record, self.tokenizer, self.max_seq_len, where, self.last_turn_only)
            else:
                parts = [next(encoded) for _ in record_texts(record)]
                doc = document(record, parts, self.bos, self.eos, self.max_seq_len, where)
            self._document(file_index, number, where, doc)
        self._flush_rows()

    def _document(self, file_index: int, number: int, where: str, doc: Document) -> None:
        if len(doc.ids) < 2:
            self.counts.note("short", where)
            return
        if doc.cut:
            self.counts.note("cut", where)
            self.counts.cut_tokens += doc.cut
        if doc.target_from >= len(doc.ids):
            self.counts.note("prompt_only", where)
        start = self.counts.tokens
        self.files["tokens"].write(np.asarray(doc.ids, dtype=self.dtype).tobytes())
        self.counts.tokens += len(doc.ids)
        vstart = -1
        if doc.labels is not None:
            vstart = self.files["valence"].bytes // 4
            self.files["valence"].write(np.asarray(doc.labels, dtype=np.float32).tobytes())
        tstart = -1
        if doc.targets is not None:
            tstart = self.files["targets"].bytes
            self.files["targets"].write(np.asarray(doc.targets, dtype=np.uint8).tobytes())
        self.counts.records += 1
        self.counts.windowed_records += len(doc.spans) > 1
        for w, (a, b) in enumerate(doc.spans):
            labels_at = -1 if vstart < 0 else vstart + a
            targets_at = -1 if tstart < 0 else tstart + a
            row = (start + a, b - a, doc.target_from, doc.prompt_len or 0, file_index, number, w, labels_at, targets_at)
            self.rows.append(row)
            self.counts.rows += 1
            if doc.targets is None:
                self.counts.targets += max(0, b - a - max(1, doc.target_from))
            else:
                self.counts.targets += sum(doc.targets[a + 1 : b])  # a row's first token is never a target
            self.counts.labelled_rows += labels_at >= 0
            self.counts.text_rows += doc.prompt_len is None

    def _flush_rows(self) -> None:
        if self.rows:
            self.files["rows"].write(np.array(self.rows, dtype=ROW_DTYPE).tobytes())
            self.rows = []

    def close(self) -> dict:
        self._flush_rows()
        return {name: f.close() for name, f in self.files.items()}


class _Progress:
    """A line to stderr at the start and every few seconds: bytes read of the inputs, rate, records."""

    def __init__(self, label: str, total_bytes: int, files: int, folder: Path, marker: Path):
        self.label, self.total, self.marker = label, max(1, total_bytes), marker
        self.started = self.last = time.monotonic()
        print(
            f"vkd-ds data: {label}: tokenizing {files} file(s), {total_bytes / 1e6:,.1f} MB, into {folder}",
            file=sys.stderr,
            flush=True,
        )

    def tick(self, done: float, records: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(1e-9, now - self.started) / 1e6
        print(
            f"vkd-ds data: {self.label}: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB "
            f"({100 * done / self.total:.0f} %), {rate:.1f} MB/s, {records:,} records",
            file=sys.stderr,
            flush=True,
        )
        if self.marker is not None:
            self.marker.touch()  # waiting ranks see a preparation that moves


def _write(
    folder: Path,
    final: Path,
    sources: list[Source],
    tokenizer,
    max_seq_len: int,
    key: str,
    made_from,
    assistant_turns: str = "all",
):
    """Every input into `folder` (a fresh partial directory, published as `final`); its manifest last.
    `made_from`: (fingerprint, what it hashes)."""
    fp, what = made_from
    files = [f for s in sources for f in s.files]
    writer = _StoreWriter(folder, tokenizer, max_seq_len, assistant_turns)
    sizes = [_input_bytes(f) for f in files]
    progress = _Progress(key, sum(sizes), len(files), final, folder / "progress")
    pending, chars, done_bytes = [], 0, 0
    file_rows = []
    for index, path in enumerate(files):
        first_row = writer.counts.rows + len(writer.rows)
        kind = file_kind(path)
        for number, record, fraction in read_records(path):
            where = source_name(path, kind, number)
            if is_empty(record):
                writer.counts.note("empty", where)
                continue
            pending.append((index, number, where, record))
            chars += sum(len(record.get(k, "")) for k in ("text", "prompt", "completion"))
            if chars >= ENCODE_CHARS:
                writer.add_batch(pending)
                pending, chars = [], 0
                progress.tick(done_bytes + fraction * sizes[index], writer.counts.records)
        writer.add_batch(pending)
        pending, chars = [], 0
        done_bytes += sizes[index]
        file_rows.append([first_row, writer.counts.rows])
    progress.tick(done_bytes, writer.counts.records, force=True)
    written = writer.close()
    (folder / "progress").unlink(missing_ok=True)
    counts = writer.counts
    if counts.rows == 0:
        raise VkdError(
            f"{', '.join(s.spec for s in sources)}: no record with text to train on "
            f"({'; '.join(describe_notes(dataclasses.asdict(counts))) or 'no records'})"
        )
    for name, used in (("valence", counts.labelled_rows > 0), ("targets", writer.files["targets"].bytes > 0)):
        if not used:  # no labelled record, no conversation
            (folder / f"{name}.bin").unlink()
            written.pop(name)
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "made_from": what,
        "vocab_size": len(tokenizer),
        "max_seq_len": int(max_seq_len),
        "token_dtype": writer.dtype.str,
        "row_dtype": ROW_DTYPE.descr,
        "files": [
            {"path": str(Path(f).resolve()), "kind": file_kind(f), "rows": r}
            for f, r in zip(files, file_rows, strict=True)
        ],
        "counts": dataclasses.asdict(counts),
        "arrays": written,
    }
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _input_bytes(path: str) -> int:
    p = Path(path)
    return sum(q.stat().st_size for q in p.iterdir() if q.is_file()) if p.is_dir() else p.stat().st_size


# ---- finding, preparing or waiting for a store ------------------------------------------------


def _partials(root: Path, name: str) -> list[Path]:
    return sorted(root.glob(f".{name}.partial-*")) if root.is_dir() else []


def _remove_dead_partials(root: Path, name: str) -> None:
    """Partial directories of preparations on this host whose process is gone (killed runs)."""
    host = socket.gethostname()
    for partial in _partials(root, name):
        tail = partial.name.rsplit(".partial-", 1)[1]
        owner_host, _, pid = tail.rpartition("-")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_store(
    root: Path,
    sources: list[Source],
    tokenizer,
    max_seq_len: int,
    *,
    wait: bool = False,
    key: str = "data",
    tokenizer_sha256: str | None = None,
    assistant_turns: str = "all",
) -> Path:
    """The directory of the store of `sources`: found complete under `root`, or written there now
    (by this process), or, with `wait` (a rank that is not rank 0), written by another process.
    `tokenizer_sha256`: the tokenizer's fingerprint, where the caller has it already."""
    files = [f for s in sources for f in s.files]
    made_from = fingerprint(files, tokenizer_sha256 or tokenizer_fingerprint(tokenizer), max_seq_len, assistant_turns)
    fp = made_from[0]
    name = fp[:20]
    final = root / name
    if (final / MANIFEST).is_file():
        return _checked(final, fp)
    if wait:
        return _checked(_wait_for(final, root, name), fp)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VkdError(f"data.store_dir ({root}) cannot be created: {err.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise VkdError(f"data.store_dir ({root}) is not writable: the token store is written there")
    _remove_dead_partials(root, name)
    partial = root / f".{name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _write(partial, final, sources, tokenizer, max_seq_len, key, made_from, assistant_turns)
        try:
            os.rename(partial, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another process published the same store first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _checked(folder: Path, fp: str) -> Path:
    """A store found by its name: its manifest's whole fingerprint must be this one."""
    try:
        found = json.loads((folder / MANIFEST).read_text()).get("fingerprint")
    except (OSError, ValueError):
        found = None
    if found != fp:
        raise VkdError(
            f"the token store {folder} does not hold these inputs (its manifest's fingerprint differs, or is "
            f"unreadable): delete {folder} and it is prepared again"
        )
    return folder


def _wait_for(final: Path, root: Path, name: str) -> Path:
    """Another rank prepares the store: wait while its partial directory shows progress."""
    last_progress = time.monotonic()
    while not (final / MANIFEST).is_file():
        for partial in _partials(root, name):
            marker = partial / "progress"
            try:
                if time.time() - marker.stat().st_mtime < WAIT_FOR_WRITER_S:
                    last_progress = time.monotonic()
            except OSError:
                last_progress = time.monotonic()  # just created (or just published)
        if time.monotonic() - last_progress > WAIT_FOR_WRITER_S:
            raise VkdError(
                f"the token store {final} did not appear within {WAIT_FOR_WRITER_S:.0f} s of rank 0's last "
                "progress: is data.store_dir on a filesystem every node shares? (or prepare it first: "
                "vkd-ds prepare-data)"
            )
        time.sleep(0.5)
    return final
