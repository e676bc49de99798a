"""The token store: a split's inputs tokenized once, on disk, read by row (`vkd-ds prepare-data`).

Layout of a store directory (DIR = data.store_dir/<fingerprint[:20]>, or any directory a store was
copied to):
- `tokens.bin`: every kept token of every document, concatenated (uint16, or uint32 past 65,536 ids);
- `rows.bin`: one ROW_DTYPE record per training row: where its tokens start, how many, the first
  target position, the prompt's length, and which file and line it came from;
- `valence.bin`: float32 labels of the tokens of labelled documents (absent when none is labelled);
- `manifest.json`: the fingerprint, the inputs, the counts, each file's bytes and SHA-256.
All three are flat arrays (`numpy.memmap`-readable). A training process reads a row's bytes with
`os.pread`, not through a mapping: read pages stay in the page cache, shared by every rank of the
node, and never in a process's resident set, which stays flat however large the corpus.

A document longer than data.max_seq_len becomes consecutive windows of max_seq_len tokens that
overlap by one token: window w starts on the last token of window w-1, which is its context for
predicting its first target, so every token but the document's first is a target exactly once.
A prompt/completion pair longer than a row is cut at max_seq_len (counted, and named at start).

The store is keyed by a fingerprint of the inputs (each file's size, mtime and the SHA-256 of its
first and last MiB: a new start costs a stat and two reads per file, not a pass over the corpus),
the tokenizer's definition and max_seq_len. It is written into a `.partial-*` directory and
published by one rename once its manifest is written, so a killed preparation leaves nothing that
looks complete, and a rerun writes the same bytes (one process, inputs in order).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vkd_ds.corpus import Source, file_kind, read_records, resolve_sources
from vkd_ds.errors import VkdError

FORMAT = "vkd-ds token store v1"
MANIFEST = "manifest.json"
ROW_DTYPE = np.dtype(
    [
        ("start", "<i8"),  # the row's first token in tokens.bin
        ("length", "<i4"),
        ("target_from", "<i4"),  # loss_mask[t] = t >= target_from
        ("prompt_len", "<i4"),  # BOS + prompt of a prompt/completion record (0: a text record)
        ("file", "<i4"),  # index into the manifest's files
        ("number", "<i8"),  # line (JSONL) or row (Parquet/Arrow) in that file, 1-based
        ("window", "<i4"),  # which window of its document (0: the first)
        ("vstart", "<i8"),  # its first token's label in valence.bin (-1: unlabelled)
    ]
)
ENCODE_CHARS = 1 << 22  # characters per encode_batch call: large enough to keep every core busy
PROGRESS_EVERY_S = 5.0
SAMPLE_BYTES = 1 << 20  # the head and tail of each input that its fingerprint hashes
VALID_KEY_BASE = 1 << 40  # Example.index of held-out rows: row + this (training rows: the row)
WAIT_FOR_WRITER_S = 300.0  # a waiting rank gives up when no preparation has shown progress for this long


def default_store_dir() -> Path:
    """Where stores live when data.store_dir is not set: $VKD_DS_DATA_CACHE, else ~/.cache/vkd-ds/data."""
    return Path(os.environ.get("VKD_DS_DATA_CACHE") or Path.home() / ".cache" / "vkd-ds" / "data")


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of how the tokenizer maps text to ids: its whole definition where it is a fast one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)]
    return hashlib.sha256((text + json.dumps(special)).encode()).hexdigest()


def input_fingerprint(path: str) -> dict:
    """What identifies an input file (or a save_to_disk directory's files) without reading all of it."""
    p = Path(path)
    parts = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    entries = []
    for q in parts:
        stat = q.stat()
        digest = hashlib.sha256()
        with q.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if stat.st_size > SAMPLE_BYTES:
                handle.seek(max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES))
                digest.update(handle.read(SAMPLE_BYTES))
        entries.append([q.name, stat.st_size, stat.st_mtime_ns, digest.hexdigest()])
    return {"kind": file_kind(path), "parts": entries}


def fingerprint(files: list[str], tokenizer, max_seq_len: int) -> tuple[str, dict]:
    """The store's key, and what it is computed from (recorded in the manifest)."""
    what = {
        "format": FORMAT,
        "inputs": [input_fingerprint(f) for f in files],
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_seq_len": int(max_seq_len),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest(), what


# ---- documents to rows -------------------------------------------------------------------------


def windows(length: int, max_seq_len: int) -> list[tuple[int, int]]:
    """[start, stop) of the rows of a text document of `length` tokens: consecutive windows of
    max_seq_len that overlap by one token (each window's first token is its context, not a target),
    so every token from 1 on is a target of exactly one window."""
    if length <= max_seq_len:
        return [(0, length)]
    spans, start = [], 0
    while start + 1 < length:
        spans.append((start, min(start + max_seq_len, length)))
        start += max_seq_len - 1
    return spans


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


NOTE_TEXT = {
    "empty": "skipped {n} record(s) with empty text (first: {first})",
    "short": "skipped {n} record(s) that tokenize to fewer than 2 tokens (first: {first})",
    "cut": "cut {n} prompt/completion record(s) longer than data.max_seq_len, {tokens} tokens dropped (first: {first})",
    "prompt_only": "{n} record(s) have no target token after the cut to data.max_seq_len (their prompt "
    "fills it; first: {first}); they add nothing to the loss",
}


def describe_notes(counts: dict) -> list[str]:
    return [
        NOTE_TEXT[reason].format(n=n, first=first, tokens=counts.get("cut_tokens", 0))
        for reason, (n, first) in counts.get("skipped", {}).items()
    ]


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
    def __init__(self, folder: Path, tokenizer, max_seq_len: int):
        self.folder = folder
        self.max_seq_len = max_seq_len
        self.dtype = id_dtype(len(tokenizer))
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.files = {name: _HashedFile(folder / f"{name}.bin") for name in ("tokens", "rows", "valence")}
        self.counts = Counts()
        self.rows: list[tuple] = []
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer's batch call spreads a batch over every core (transformers' own
        # __call__ does the same work with Python-side conversions on top, ~35 % slower here).
        self.encode = (
            (lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)])
            if backend is not None and hasattr(backend, "encode_batch_fast")
            else (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
        )

    def add_batch(self, pending: list[tuple[int, int, str, dict]]) -> None:
        """Tokenize and store a batch of (file index, line, file:line, record)."""
        texts = []
        for _, _, _, record in pending:
            texts.extend([record["text"]] if "text" in record else [record["prompt"], record["completion"]])
        encoded = iter(self.encode(texts))
        for file_index, number, where, record in pending:
            if "text" in record:
                self._text(file_index, number, where, record, next(encoded))
            else:
                self._pair(file_index, number, where, record, next(encoded), next(encoded))
        self._flush_rows()

    def _labels(self, record: dict, body: list[int], tail: list[int], where: str) -> np.ndarray | None:
        from vkd_ds.data import token_valence

        if "valence" not in record:
            return None
        return np.asarray(token_valence(record["valence"], body, self.bos, tail, where), dtype=np.float32)

    def _store(self, ids: list[int], labels: np.ndarray | None) -> tuple[int, int]:
        start = self.counts.tokens
        self.files["tokens"].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.counts.tokens += len(ids)
        vstart = -1
        if labels is not None:
            vstart = self.files["valence"].bytes // 4
            self.files["valence"].write(labels.tobytes())
        return start, vstart

    def _text(self, file_index: int, number: int, where: str, record: dict, body: list[int]) -> None:
        ids = self.bos + body
        if len(ids) < 2:
            self.counts.note("short", where)
            return
        labels = self._labels(record, body, [], where)
        start, vstart = self._store(ids, labels)
        spans = windows(len(ids), self.max_seq_len)
        self.counts.records += 1
        self.counts.windowed_records += len(spans) > 1
        for w, (a, b) in enumerate(spans):
            self._row(start + a, b - a, 1, 0, file_index, number, w, -1 if vstart < 0 else vstart + a)
            self.counts.text_rows += 1

    def _pair(self, file_index, number, where, record, prompt: list[int], completion: list[int]) -> None:
        body = prompt + completion
        ids = self.bos + body + self.eos
        labels = self._labels(record, body, self.eos, where)
        target_from = len(self.bos) + len(prompt)
        if len(ids) > self.max_seq_len:
            self.counts.note("cut", where)
            self.counts.cut_tokens += len(ids) - self.max_seq_len
            ids = ids[: self.max_seq_len]
            labels = None if labels is None else labels[: self.max_seq_len]
        if target_from >= len(ids):
            self.counts.note("prompt_only", where)
        start, vstart = self._store(ids, labels)
        self.counts.records += 1
        self._row(start, len(ids), target_from, min(target_from, len(ids)), file_index, number, 0, vstart)

    def _row(self, start, length, target_from, prompt_len, file_index, number, window, vstart) -> None:
        self.rows.append((start, length, target_from, prompt_len, file_index, number, window, vstart))
        self.counts.rows += 1
        self.counts.targets += max(0, length - max(1, target_from))
        self.counts.labelled_rows += vstart >= 0

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


def _write(folder: Path, final: Path, files: list[str], sources: list[Source], tokenizer, max_seq_len: int, key: str):
    """Every input into `folder` (a fresh partial directory, published as `final`); its manifest last."""
    fp, what = fingerprint(files, tokenizer, max_seq_len)
    writer = _StoreWriter(folder, tokenizer, max_seq_len)
    sizes = [_input_bytes(f) for f in files]
    progress = _Progress(key, sum(sizes), len(files), final, folder / "progress")
    pending, chars, done_bytes = [], 0, 0
    file_rows = []
    for index, path in enumerate(files):
        first_row = writer.counts.rows + len(writer.rows)
        kind = file_kind(path)
        for number, record, fraction in read_records(path):
            where = path if kind == "text" else f"{path}:{number}"
            from vkd_ds.data import is_empty

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
            f"({'; '.join(describe_notes(_counts_dict(counts))) or 'no records'})"
        )
    if counts.labelled_rows == 0:
        (folder / "valence.bin").unlink()
        written.pop("valence")
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
        "counts": _counts_dict(counts),
        "arrays": written,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    with open(folder / MANIFEST, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def _counts_dict(counts: Counts) -> dict:
    return {k: v for k, v in counts.__dict__.items()}


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
    root: Path, sources: list[Source], tokenizer, max_seq_len: int, *, wait: bool = False, key: str = "data"
) -> Path:
    """The directory of the store of `sources`: found complete under `root`, or written there now
    (by this process), or, with `wait` (a rank that is not rank 0), written by another process."""
    files = [f for s in sources for f in s.files]
    name = fingerprint(files, tokenizer, max_seq_len)[0][:20]
    final = root / name
    if (final / MANIFEST).is_file():
        return final
    if wait:
        return _wait_for(final, root, name)
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
        _write(partial, final, files, sources, tokenizer, max_seq_len, key)
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


# ---- reading ----------------------------------------------------------------------------------


def is_store(path) -> bool:
    if not isinstance(path, str):
        return False
    p = Path(os.path.expanduser(path))
    manifest = p / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_store_manifest(folder: Path, key: str) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VkdError(f"{key}: cannot read the token store's manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VkdError(f"{key}: {path} is not a vkd-ds token store manifest (no {FORMAT!r})")
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
        # How a row names its record in messages: file:line (or :row), a plain text file by its name.
        self.names = [e["path"] if e["kind"] == "text" else e["path"] + ":{}" for e in manifest["files"]]
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

    def row(self, index: int) -> np.void:
        return self._read("rows", ROW_DTYPE, index, 1)[0]

    def __getitem__(self, index):
        from vkd_ds.data import Example

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        r = self.row(index)
        length, target_from = int(r["length"]), int(r["target_from"])
        ids = self._read("tokens", self.token_dtype, int(r["start"]), length).tolist()
        mask = [0] * min(target_from, length) + [1] * max(0, length - target_from)
        valence = None
        if r["vstart"] >= 0:
            valence = self._read("valence", np.dtype("<f4"), int(r["vstart"]), length).tolist()
        where = self.names[r["file"]].format(int(r["number"]))
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
            f"tokens, {c['tokens']:,} tokens ({c['targets']:,} targets) from {len(self.names)} file(s); "
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

    def mixture(self) -> list[tuple[int, int, float]] | None:
        """[(first row, stop row, weight)] of each weighted source; None where no source is weighted."""
        if not self.sources or all(s.weight is None for s in self.sources):
            return None
        ranges, at = [], 0
        rows = [entry["rows"] for entry in self.manifest["files"]]
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
    value, key: str, tokenizer, max_seq_len: int, store_dir: str | None, *, key_base: int = 0, wait: bool = False
) -> TokenRows:
    """A split's rows: `value` is a prepared store's directory, or the inputs (prepared here once,
    or, with `wait`, by the job's rank 0)."""
    if is_store(value):
        folder = Path(os.path.expanduser(value))
        manifest = read_store_manifest(folder, key)
        if manifest["made_from"]["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
            raise VkdError(
                f"{key}: the token store {folder} was prepared with another tokenizer than data.tokenizer_path "
                f"({getattr(tokenizer, 'name_or_path', '?')}); prepare it again with this one (vkd-ds prepare-data)"
            )
        if manifest["max_seq_len"] != max_seq_len:
            raise VkdError(
                f"{key}: the token store {folder} was prepared with data.max_seq_len={manifest['max_seq_len']}, "
                f"this run has {max_seq_len}; prepare it again (vkd-ds prepare-data)"
            )
        return TokenRows(folder, manifest, key_base)
    sources = resolve_sources(value, key)
    root = Path(os.path.expanduser(store_dir)) if store_dir else default_store_dir()
    folder = prepare_store(root, sources, tokenizer, max_seq_len, wait=wait, key=key)
    manifest = read_store_manifest(folder, key)
    return TokenRows(folder, manifest, key_base, sources)


def open_splits(data, tokenizer) -> dict[str, tuple[object, TokenRows]]:
    """{split: (the config's value, its rows)} of data.train_path and data.valid_path (if set), from
    the settings' `data` section."""
    wait = waits_for_rank_zero()
    splits = {}
    for split, value, base in (("train", data.train_path, 0), ("valid", data.valid_path, VALID_KEY_BASE)):
        if value is not None:
            rows = open_split(
                value, f"data.{split}_path", tokenizer, data.max_seq_len, data.store_dir, key_base=base, wait=wait
            )
            splits[split] = (value, rows)
    return splits


def waits_for_rank_zero() -> bool:
    """A rank of a launched job other than rank 0 waits for rank 0's preparation (the launcher's
    `vkd-ds train` prepares before it starts any rank; SLURM and the bare launcher do not)."""
    return int(os.environ.get("RANK", "0") or 0) != 0
