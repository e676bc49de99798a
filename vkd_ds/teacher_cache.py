"""The teacher cache: the teacher's outputs stored once (`vkd-ds cache-teacher`), read by training
(`teacher.cache=DIR`) in place of the teacher, which is then never loaded.

For every valid position (one whose next token is a target) of every record of the data files, a
cache holds the teacher's top-k token ids and their log-probabilities under softmax(z_T/T), the log
of the mass outside them (the tail bucket), the token entropy at T = 1 (the saliency's), the log-
probability of the data's next token at T = 1 (held-out teacher perplexity) and, with a teacher
valence head, its valence trajectory (k values). Token KD against it is the divergence between the
bucketed distributions (losses.SparseTeacher), exact when top_k equals the vocabulary.

Layout: DIR/manifest.json (fingerprints of everything the values depend on, the shards, bytes per
token), DIR/<split>/shard_NNNNN/<array>.npy. A shard is written whole into a `.partial` directory and
published with one rename, so a killed run leaves only complete shards, and a rerun with the same
settings writes the missing ones only. The shards still to write, over all splits, are shared among
the ranks by records (assign_shards: each rank within one shard of the mean); each shard is written
by one rank, in the same micro-batches on every run: a resumed cache has the bytes of an uninterrupted
one. The teacher's weights are hashed once per job (weights_fingerprint, FINGERPRINT_ENV).
Arrays are memory-mapped when read, and their pages are released once a batch is copied out, so
a training process's resident memory does not grow with the cache's size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vkd_ds.errors import VkdError
from vkd_ds.losses import LOG_ZERO, SparseTeacher, chunk_rows, shift_for_next_token
from vkd_ds.sequences import Sequences, selected
from vkd_ds.token_store import VALID_KEY_BASE, tokenizer_fingerprint

FORMAT = "vkd-ds teacher cache v1"
MAX_OPEN_SHARDS = 32  # mapped at once by a training process (about 6 file descriptors each)
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
PRECISIONS = {"fp16": np.float16, "fp32": np.float32}


# ---- what is stored per position ----------------------------------------------------------------


@torch.no_grad()
def teacher_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int,
    top_k: int,
    temperature: float,
    chunk_tokens: int = 256,
) -> dict[str, torch.Tensor]:
    """The cache's values at the valid positions of `mask` (row-major order) from the teacher's
    logits [B,S,Vt]: ids [N,k] (most probable first), logp [N,k] at T, tail [N] (log of the rest at
    T, LOG_ZERO when there is none), entropy [N] and target_logp [N] at T = 1. fp32 per chunk."""
    flat = logits.flatten(0, 1)
    index = mask.flatten().nonzero(as_tuple=True)[0]
    flat_targets = targets.flatten()
    n = index.numel()
    out = {
        "ids": torch.empty((n, top_k), dtype=torch.int64),
        "logp": torch.empty((n, top_k)),
        "tail": torch.full((n,), LOG_ZERO),
        "entropy": torch.empty(n),
        "target_logp": torch.empty(n),
    }
    for start in range(0, n, chunk_rows(chunk_tokens, vocab_size)):
        sel = index[start : start + chunk_rows(chunk_tokens, vocab_size)]
        rows = slice(start, start + sel.numel())
        z = flat[sel, :vocab_size].float()
        log_p1 = F.log_softmax(z, dim=-1)
        out["entropy"][rows] = -(log_p1.exp() * log_p1).sum(-1).cpu()
        out["target_logp"][rows] = log_p1.gather(1, flat_targets[sel][:, None]).squeeze(1).cpu()
        del log_p1
        values, ids = z.topk(top_k, dim=-1, sorted=True)
        z_t = z.div_(temperature)
        lse = torch.logsumexp(z_t, dim=-1)
        out["ids"][rows] = ids.cpu()
        out["logp"][rows] = (values / temperature - lse[:, None]).clamp_(min=LOG_ZERO).cpu()
        if top_k < vocab_size:
            outside = z_t.scatter_(1, ids, float("-inf"))
            out["tail"][rows] = (torch.logsumexp(outside, dim=-1) - lse).clamp_(min=LOG_ZERO).cpu()
    return out


def id_dtype(vocab_size: int):
    """The narrowest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def array_dtypes(vocab_size: int, precision: str, valence: bool) -> dict[str, np.dtype]:
    real = PRECISIONS[precision]
    dtypes = {
        "ids": id_dtype(vocab_size),
        "logp": real,
        "tail": real,
        "entropy": real,
        "target_logp": real,
    }
    if valence:
        dtypes["valence"] = real
    return {name: np.dtype(t) for name, t in dtypes.items()}


def bytes_per_position(vocab_size: int, precision: str, top_k: int, valence_k: int | None) -> int:
    """What one position costs on disk (the offsets, 8 bytes per record, come on top)."""
    dtypes = array_dtypes(vocab_size, precision, valence_k is not None)
    widths = {"ids": top_k, "logp": top_k, "valence": valence_k or 0}
    return sum(dtype.itemsize * widths.get(name, 1) for name, dtype in dtypes.items())


# ---- fingerprints -------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**24):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The teacher's weights are hashed once per job (minutes for a large teacher): the launcher hashes them
# and hands the digest to its ranks in this variable, with each weight file's size and mtime_ns; a
# process reuses it only while its own stat of the files says the same, and hashes them itself else.
FINGERPRINT_ENV = "VKD_TEACHER_FINGERPRINT"
_hashed: dict[str, dict] = {}  # resolved teacher dir -> its entry, hashed or handed over in this process


def teacher_fingerprint(path: str | Path) -> dict:
    """The teacher directory's config (as a dict and its hash) and one hash over its weight files."""
    directory = Path(path)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    canonical = json.dumps({k: v for k, v in config.items() if k != "transformers_version"}, sort_keys=True)
    return {
        "config": config,
        "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "weights_sha256": weights_fingerprint(directory),
    }


def weights_fingerprint(path: str | Path) -> str:
    """One SHA-256 over the teacher's weight files (name and hash of each): this process's or the
    launcher's earlier one (FINGERPRINT_ENV) when every file's size and mtime_ns are still the same."""
    directory = Path(path).resolve()
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    entry = {"path": str(directory), "files": _file_stats(files)}  # stat before hashing: a change after is seen
    for known in (_hashed.get(entry["path"]), _handed_over()):
        if known is not None and {k: known.get(k) for k in entry} == entry:
            _hashed[entry["path"]] = known
            return known["weights_sha256"]
    weights = hashlib.sha256()
    for file in files:
        weights.update(f"{file.name}:{file_sha256(file)}\n".encode())
    _trace_hash(directory)
    _hashed[entry["path"]] = {**entry, "weights_sha256": weights.hexdigest()}
    return weights.hexdigest()


def fingerprint_env(path: str | Path | None) -> dict[str, str]:
    """{FINGERPRINT_ENV: value} for the processes this one starts, when it has hashed (or been handed)
    the weights of teacher `path` and they are unchanged since; {} else. The value is shell-safe
    (base64url of JSON): it survives `export K=V` lines such as the deepspeed launcher's."""
    if path is None:
        return {}
    directory = Path(path).resolve()
    known = _hashed.get(str(directory))
    if known is None or not directory.is_dir():
        return {}
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if known["files"] != _file_stats(files):
        return {}
    return {FINGERPRINT_ENV: base64.urlsafe_b64encode(json.dumps(known, separators=(",", ":")).encode()).decode()}


def _file_stats(files: list[Path]) -> dict[str, list[int]]:
    return {file.name: [(st := file.stat()).st_size, st.st_mtime_ns] for file in files}


def _handed_over() -> dict | None:
    """The launcher's entry (FINGERPRINT_ENV), or None: unset, or not one (then this process hashes)."""
    value = os.environ.get(FINGERPRINT_ENV)
    if not value:
        return None
    try:
        entry = json.loads(base64.urlsafe_b64decode(value.encode()))
    except (ValueError, TypeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("weights_sha256"), str) else None


def _trace_hash(directory: Path) -> None:
    """For tests: with VKD_TRACE_TEACHER_HASH=FILE, every hash of a teacher's weights appends a line
    (pid and directory) to FILE. Unset in normal runs."""
    trace = os.environ.get("VKD_TRACE_TEACHER_HASH")
    if trace:
        with open(trace, "a") as handle:
            handle.write(f"{os.getpid()} {directory}\n")


def valid_positions(loss_mask) -> int:
    """Positions with a target: position t predicts token t+1 (losses.shift_for_next_token)."""
    return int(sum(loss_mask[1:]))


# ---- the plan: shards, fingerprints, the manifest ----------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's values are: settings that must match for a cache to serve a run."""

    top_k: int
    temperature: float
    precision: str
    records_per_shard: int


def plan_manifest(settings, tokenizer, files: dict[str, tuple[str, list]], spec: CacheSpec, valence_k: int | None):
    """The manifest of a cache of `files` ({split: (path, examples)}), before any shard is written."""
    vocab = len(tokenizer)
    if not 1 <= spec.top_k <= vocab:
        raise VkdError(f"config key `cache.top_k` must be in [1, {vocab}] (the vocabulary), got {spec.top_k}")
    splits = {}
    for split, (_, examples) in files.items():
        shards = []
        for number, first in enumerate(range(0, len(examples), spec.records_per_shard)):
            chunk = examples[first : first + spec.records_per_shard]
            shards.append(
                {
                    "name": f"shard_{number:05d}",
                    "records": [first, first + len(chunk)],
                    "positions": sum(valid_positions(ex.loss_mask) for ex in chunk),
                }
            )
        splits[split] = {
            "data": str(examples.folder),
            "store": examples.fingerprint,  # the token store's: its rows are the cache's records, in order
            "records": len(examples),
            "positions": sum(s["positions"] for s in shards),
            "shards": shards,
        }
    head = settings.valence.teacher_head
    return {
        "format": FORMAT,
        "complete": False,
        "teacher": {"path": str(Path(settings.teacher.path).resolve()), **teacher_fingerprint(settings.teacher.path)},
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "max_seq_len": int(settings.data.max_seq_len),
        "top_k": spec.top_k,
        "temperature": spec.temperature,
        "precision": spec.precision,
        "records_per_shard": spec.records_per_shard,
        "valence": None if valence_k is None else {"k": valence_k, "head_sha256": file_sha256(head)},
        "dtypes": {k: v.str for k, v in array_dtypes(vocab, spec.precision, valence_k is not None).items()},
        "bytes_per_position": bytes_per_position(vocab, spec.precision, spec.top_k, valence_k),
        "splits": splits,
    }


# Keys of the manifest that decide the values: a cache dir holding a manifest that differs in any
# of them is another cache (cache-teacher refuses to mix them).
PLAN_KEYS = ("format", "teacher", "tokenizer_sha256", "vocab_size", "max_seq_len", "top_k", "temperature")
PLAN_KEYS += ("precision", "records_per_shard", "valence", "dtypes", "splits")


def read_manifest(directory: str | Path, key: str = "teacher.cache") -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise VkdError(f"{key}: directory not found: {directory} (write a cache with `vkd-ds cache-teacher`)")
    if not path.is_file():
        raise VkdError(f"{key}: {directory} has no {MANIFEST}: not a teacher cache (write one: vkd-ds cache-teacher)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VkdError(f"{key}: cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VkdError(f"{key}: {path} is not a vkd-ds teacher cache manifest (no {FORMAT!r})")
    return manifest


def write_json_atomic(path: Path, value: dict) -> None:
    staging = path.with_name(path.name + ".partial")
    with open(staging, "w") as handle:
        handle.write(json.dumps(value, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def describe_plan_difference(old: dict, new: dict) -> str:
    """The first setting in which two caches' manifests differ, in words."""
    words = {
        "teacher": "another teacher",
        "tokenizer_sha256": "another tokenizer",
        "max_seq_len": "another data.max_seq_len",
        "top_k": "another cache.top_k",
        "temperature": "another cache.temperature",
        "precision": "another cache.precision",
        "records_per_shard": "another cache.records_per_shard",
        "valence": "another valence head",
        "splits": "other data files",
    }
    old, new = _plan_view(old), _plan_view(new)
    for key in PLAN_KEYS:
        if old.get(key) != new.get(key):
            return f"{words.get(key, key)} ({key}: {_short(old.get(key))} in the cache, {_short(new.get(key))} now)"
    return "nothing"


def _plan_view(manifest: dict) -> dict:
    """What decides a cache's values: its PLAN_KEYS, without where the files were (a teacher or data
    file moved elsewhere is the same one; their fingerprints say so)."""
    view = {key: manifest.get(key) for key in PLAN_KEYS}
    if isinstance(view["teacher"], dict):
        view["teacher"] = {k: v for k, v in view["teacher"].items() if k != "path"}
    if isinstance(view["splits"], dict):
        view["splits"] = {
            split: {k: v for k, v in entry.items() if k != "data"} for split, entry in view["splits"].items()
        }
    return view


def same_plan(old: dict, new: dict) -> bool:
    return _plan_view(old) == _plan_view(new)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


# ---- checks made by training before anything runs ----------------------------------------------


def check_for_training(settings, tokenizer, files: dict[str, tuple[str, list]], needs_valence: bool) -> dict:
    """The cache of `teacher.cache`, checked against the run: teacher, tokenizer, data files,
    max_seq_len, temperature, valence, every shard's files. Its manifest; VkdError naming the
    first mismatch."""
    directory = Path(settings.teacher.cache)
    m = read_manifest(directory)
    where = f"teacher.cache ({directory})"
    if not m.get("complete"):
        raise VkdError(f"{where} is incomplete: rerun `vkd-ds cache-teacher` with its settings to finish it")
    if settings.teacher.path is not None:
        now = teacher_fingerprint(settings.teacher.path)
        if (now["config_sha256"], now["weights_sha256"]) != (
            m["teacher"]["config_sha256"],
            m["teacher"]["weights_sha256"],
        ):
            part = "config" if now["config_sha256"] != m["teacher"]["config_sha256"] else "weights"
            raise VkdError(
                f"{where} was made from another teacher ({m['teacher']['path']}): the {part} of teacher.path "
                f"({settings.teacher.path}) differ; write a cache of this teacher or leave teacher.path unset"
            )
    if m["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        tokenizer_dir = settings.data.tokenizer_path
        raise VkdError(f"{where} was made with another tokenizer than data.tokenizer_path ({tokenizer_dir})")
    if m["max_seq_len"] != settings.data.max_seq_len:
        raise VkdError(
            f"{where} was made with data.max_seq_len={m['max_seq_len']}, this run has {settings.data.max_seq_len}"
        )
    if not math.isclose(m["temperature"], settings.loss.temperature, rel_tol=1e-9):
        raise VkdError(
            f"{where} holds the teacher at T={m['temperature']:g} but loss.temperature={settings.loss.temperature:g}: "
            "set loss.temperature to the cache's, or write a cache at this temperature (cache.temperature)"
        )
    for split, (path, examples) in files.items():
        key = f"data.{split}_path"
        stored = m["splits"].get(split)
        if stored is None:
            raise VkdError(f"{where} has no {split} split, and {key} is set: cache {path} too (vkd-ds cache-teacher)")
        if stored.get("store") != examples.fingerprint or stored["records"] != len(examples):
            raise VkdError(
                f"{where} was made from other {split} data ({stored['data']}) than {key} ({path}) "
                "(or by an older vkd-ds): write it again with vkd-ds cache-teacher"
            )
    if needs_valence:
        if m["valence"] is None:
            raise VkdError(
                f"{where} holds no teacher valence, and loss.val > 0 or weighting.lam > 0 need it: write the cache "
                "with valence.teacher_head set, or set loss.val=0 weighting.lam=0"
            )
        if m["valence"]["k"] != settings.valence.k:
            cached_k = m["valence"]["k"]
            raise VkdError(f"{where} holds valence trajectories of k={cached_k}, valence.k={settings.valence.k}")
        head = settings.valence.teacher_head
        if head and file_sha256(head) != m["valence"]["head_sha256"]:
            raise VkdError(f"{where} was made with another teacher valence head than valence.teacher_head ({head})")
    for split in files:
        for shard in m["splits"][split]["shards"]:
            _check_shard(directory / split / shard["name"], shard, m)
    return m


def _shard_shapes(shard: dict, m: dict) -> dict[str, tuple[int, ...]]:
    n, k = shard["positions"], m["top_k"]
    records = shard["records"][1] - shard["records"][0]
    shapes = {"ids": (n, k), "logp": (n, k), "tail": (n,), "entropy": (n,), "target_logp": (n,)}
    if m["valence"] is not None:
        shapes["valence"] = (n, m["valence"]["k"])
    shapes["offsets"] = (records + 1,)
    return shapes


def _dtypes(m: dict) -> dict[str, np.dtype]:
    return {**{k: np.dtype(v) for k, v in m["dtypes"].items()}, "offsets": np.dtype(np.int64)}


def _check_shard(path: Path, shard: dict, m: dict) -> None:
    if not path.is_dir():
        raise VkdError(f"teacher.cache: shard {path} is missing: rerun vkd-ds cache-teacher with the cache's settings")
    dtypes = _dtypes(m)
    for name, shape in _shard_shapes(shard, m).items():
        file = path / f"{name}.npy"
        if not file.is_file():
            raise VkdError(f"teacher.cache: {file} is missing (a damaged shard: delete {path} and rerun cache-teacher)")
        try:
            got_shape, dtype, offset = _npy_header(file)
        except (ValueError, OSError) as err:
            raise VkdError(f"teacher.cache: {file} is damaged ({str(err).splitlines()[0]})") from None
        if got_shape != shape or dtype != dtypes[name]:
            raise VkdError(
                f"teacher.cache: {file} holds {dtype}{list(got_shape)}, the manifest says {dtypes[name]}{list(shape)}"
            )
        size = file.stat().st_size
        want = offset + int(np.prod(shape)) * dtype.itemsize
        if size != want:
            raise VkdError(
                f"teacher.cache: {file} is truncated ({size} of {want} bytes): delete {path} and rerun cache-teacher"
            )


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), np.dtype(dtype), handle.tell()


# ---- reading: the teacher as the cache serves it -------------------------------------------------


class _Mapped:
    """One .npy file, memory-mapped read-only. `take` copies rows out; `release` drops the mapping's
    pages from this process (they stay in the page cache). The whole mapping is released, not the
    rows read: the kernel maps the pages around a faulting one too (fault-around), including pages
    of earlier batches, and an empty range costs the release next to nothing."""

    def __init__(self, path: Path):
        shape, self.dtype, self.offset = _npy_header(path)
        self.shape = shape
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.ndarray(shape, self.dtype, buffer=self.map, offset=self.offset)

    def take(self, first: int, stop: int) -> np.ndarray:
        return np.array(self.array[first:stop])

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

    def _shard(self, number: int) -> dict[str, _Mapped]:
        if number in self.open_shards:
            self.open_shards.move_to_end(number)
            return self.open_shards[number]
        while len(self.open_shards) >= MAX_OPEN_SHARDS:
            for mapped in self.open_shards.popitem(last=False)[1].values():
                mapped.close()
        folder, shard = self.folders[number]
        names = [name for name in _shard_shapes(shard, self.manifest) if name != "offsets"]
        self.open_shards[number] = {name: _Mapped(folder / f"{name}.npy") for name in names}
        return self.open_shards[number]

    def on_batch(self, batch: dict) -> dict:
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
            found = self._locate(int(key))
            offsets = self.offsets[found[0]]
            first, stop = int(offsets[found[1]]), int(offsets[found[1] + 1])
            if stop - first != counts[b]:
                raise VkdError(
                    f"teacher.cache ({self.directory}): a record has {stop - first} cached positions, "
                    f"the batch {counts[b]}"
                )
            shard = self._shard(found[0])
            for name in parts:
                if name in shard:
                    parts[name].append(shard[name].take(first, stop))
                    touched[id(shard[name])] = shard[name]
        for mapped in touched.values():
            mapped.release()
        dev = self.device
        k = self.manifest["top_k"]

        def joined(name, width=None, dtype=torch.float32):
            if parts[name]:
                wide = np.int64 if dtype == torch.int64 else np.float32
                return torch.from_numpy(np.concatenate(parts[name]).astype(wide)).to(dev, dtype)
            shape = (0,) if width is None else (0, width)
            return torch.zeros(shape, dtype=dtype, device=dev)

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


# ---- writing: `vkd-ds cache-teacher` -----------------------------------------------------------


def write_cache(cfg) -> dict:
    """Runs on every rank of the launched job: the teacher (ZeRO-3, offloaded, as training builds
    it) over every record of the data files; the manifest, complete, on rank 0 at the end."""
    from vkd_ds import dist, engines
    from vkd_ds.build import build_objective
    from vkd_ds.data import collate
    from vkd_ds.ds_config import teacher_ds_config
    from vkd_ds.memory import free_device_bytes
    from vkd_ds.metrics import setup_logging
    from vkd_ds.objective import Teacher
    from vkd_ds.valence import load_head

    plan = prepare_cache(cfg)
    s, manifest, files, tokenizer = plan.settings, plan.manifest, plan.files, plan.tokenizer
    dist.init()
    log = setup_logging(None, dist.is_main())
    directory = Path(s.cache.dir)
    world, rank = dist.world_size(), dist.rank()
    ds = teacher_ds_config(s, dist.on_gpu())
    engine = engines.build_teacher_engine(s.teacher.path, ds)
    head = None
    if manifest["valence"] is not None:
        head = load_head(s.valence.teacher_head, int(s.valence.k), plan.teacher_width).to(dist.device())
        head.requires_grad_(False)
    # The teacher's logits go through the chunked loss code here: plan the chunks for their width.
    objective = build_objective(s, [], manifest["vocab_size"]).planned(
        plan.teacher_width,
        torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32,
        dist.on_gpu(),
        free_device_bytes(dist.on_gpu(), dist.local_world_size()),
    )
    teacher = Teacher(engine, objective, head)
    if dist.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MANIFEST).is_file():
            write_json_atomic(directory / MANIFEST, manifest)
    dist.barrier()
    shards = [(split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]]
    # Complete on disk as any rank sees it (every rank must make the same plan).
    seen = torch.tensor([(directory / split / shard["name"]).is_dir() for split, shard in shards], dtype=torch.int64)
    complete = dist.all_reduce_max(seen).tolist() if shards else []
    todo = assign_shards([shard for shard, done in zip(shards, complete, strict=True) if not done], world)[rank]
    micro = int(s.trainer.micro_batch_size)
    batches = [(split, shard, first) for split, shard in todo for first in range(*shard["records"], micro)]
    total = int(dist.all_reduce_max(torch.tensor([len(batches)]))[0])
    splits = manifest["splits"]
    log.info(
        "cache-teacher: %s, top-%d at T=%g (%s), %d shard(s) to write on %d rank(s), %d already complete, "
        "%d bytes per position",
        ", ".join(f"{name} {e['records']} records / {e['positions']} positions" for name, e in splits.items()),
        manifest["top_k"],
        manifest["temperature"],
        manifest["precision"],
        len(shards) - sum(complete),
        world,
        sum(complete),
        manifest["bytes_per_position"],
    )
    written = torch.zeros(2, world, dtype=torch.int64)  # records and shards this rank wrote, in its column
    started = time.perf_counter()
    written_positions = 0
    dtypes = _dtypes(manifest)
    vocab = manifest["vocab_size"]
    pending: dict[str, list] = {}
    dummy = collate([files["train"][1][0]], tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    for i in range(total):
        if i >= len(batches):
            # ZeRO-3 forwards are collective: a rank with no shard left joins with a batch it discards.
            teacher(dummy["input_ids"].to(dist.device()), dummy["attention_mask"].to(dist.device()))
            continue
        split, shard, first = batches[i]
        examples = files[split][1][first : min(first + micro, shard["records"][1])]
        batch = {k: v.to(dist.device()) for k, v in collate(examples, pad).items()}
        out = teacher(batch["input_ids"], batch["attention_mask"])
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        rows = teacher_rows(
            out["logits"], targets, mask, vocab, manifest["top_k"], manifest["temperature"], objective.chunk_tokens
        )
        if head is not None:
            rows["valence"] = out["valence"][mask].float().cpu()
        # In the stored types at once: a shard waits in memory until its last batch.
        rows = {name: value.numpy().astype(dtypes[name]) for name, value in rows.items()}
        rows["counts"] = mask.sum(1).cpu().numpy().astype(np.int64)
        pending.setdefault(shard["name"] + split, []).append(rows)
        written_positions += int(mask.sum())
        if first + micro >= shard["records"][1]:
            _write_shard(directory / split / shard["name"], pending.pop(shard["name"] + split), manifest)
            log.info("cache-teacher: rank %d wrote %s/%s", rank, split, shard["name"])
            written[:, rank] += torch.tensor([shard["records"][1] - shard["records"][0], 1])
    dist.barrier()
    records, count = dist.all_reduce_sum(written).tolist()
    log.info(
        "cache-teacher: records (shards) written per rank: %s",
        ", ".join(f"{n} ({c})" for n, c in zip(records, count, strict=True)),
    )
    seconds = time.perf_counter() - started
    positions = int(dist.all_reduce_sum(torch.tensor([written_positions]))[0])
    if dist.is_main():
        for split, entry in manifest["splits"].items():
            for shard in entry["shards"]:
                _check_shard(directory / split / shard["name"], shard, manifest)
        disk = sum(f.stat().st_size for f in directory.rglob("*.npy"))
        all_positions = sum(e["positions"] for e in manifest["splits"].values())
        final = read_manifest(directory, "cache.dir")  # a rerun keeps the first write's throughput
        final["complete"] = True
        final["bytes"] = disk
        final["bytes_per_token"] = disk / max(all_positions, 1)
        if positions == all_positions:
            final["write_positions_per_s"] = positions / seconds
        write_json_atomic(directory / MANIFEST, final)
        log.info(
            "cache-teacher: complete, %d positions, %.1f MB, %.1f bytes per token%s",
            all_positions,
            disk / 1e6,
            final["bytes_per_token"],
            f", wrote {positions / seconds:.0f} positions/s" if positions else "",
        )
    dist.barrier()
    return manifest


def assign_shards(shards: list[tuple[str, dict]], world: int) -> list[list[tuple[str, dict]]]:
    """The shards to write, (split, manifest entry) over all splits, given to `world` ranks: largest
    first, each to the rank with the fewest records so far (the lowest-numbered of them). Each rank's
    records are then within one shard's of every other rank's, hence of the mean. Deterministic: every
    rank computes the same plan. Each rank's shards in the order given."""
    loads = [0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    size = [shard["records"][1] - shard["records"][0] for _, shard in shards]
    for i in sorted(range(len(shards)), key=lambda i: (-size[i], i)):
        least = min(range(world), key=lambda r: (loads[r], r))
        loads[least] += size[i]
        ranks[least].append(i)
    return [[shards[i] for i in sorted(mine)] for mine in ranks]


def _write_shard(path: Path, parts: list[dict], manifest: dict) -> None:
    """A shard's arrays into PATH.partial, published with one rename."""
    staging = path.with_name(path.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed run
    staging.mkdir(parents=True)
    dtypes = _dtypes(manifest)
    counts = np.concatenate([p["counts"] for p in parts])
    arrays = {"offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
    for name in dtypes:
        if name == "offsets":
            continue
        arrays[name] = np.concatenate([p[name] for p in parts]).astype(dtypes[name], copy=False)
    for number, (name, array) in enumerate(arrays.items()):
        with open(staging / f"{name}.npy", "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        if number == 0:
            _maybe_die_mid_shard()
    os.replace(staging, path)


_shards_begun = 0


def _maybe_die_mid_shard() -> None:
    """Fault injection for tests: with VKD_FAULT_CACHE_KILL=N, this process kills itself (SIGKILL) after
    the first array of its Nth shard is on disk, before the shard is published. Unset in normal runs."""
    global _shards_begun
    limit = os.environ.get("VKD_FAULT_CACHE_KILL")
    if not limit:
        return
    _shards_begun += 1
    if _shards_begun >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class CachePlan:
    settings: object
    tokenizer: object
    files: dict[str, tuple[str, list]]
    manifest: dict
    teacher_width: int


def prepare_cache(cfg) -> CachePlan:
    """Every check of `vkd-ds cache-teacher`, with no side effects: the settings, the teacher,
    tokenizer and data, `cache.*`, and a cache dir that holds either nothing or this same cache."""
    from vkd_ds.features import hidden_width
    from vkd_ds.models import check_vocab, load_model_config, load_tokenizer
    from vkd_ds.settings import Settings
    from vkd_ds.token_store import open_splits
    from vkd_ds.valence import load_head

    s = Settings.from_config(cfg)
    if s.cache.dir is None:
        raise VkdError("config key `cache.dir` is required by cache-teacher (set it with cache.dir=...)")
    if s.teacher.path is None:
        raise VkdError("config key `teacher.path` is required by cache-teacher: the teacher to cache")
    teacher_config = load_model_config(s.teacher.path, "teacher.path")
    tokenizer = load_tokenizer(s.data.tokenizer_path)
    check_vocab(len(tokenizer), teacher_config.vocab_size, f"teacher ({s.teacher.path})")
    files = open_splits(s.data, tokenizer)
    width = hidden_width(teacher_config)
    valence_k = None
    if s.valence.teacher_head:
        load_head(s.valence.teacher_head, int(s.valence.k), width)
        valence_k = int(s.valence.k)
    temperature = float(s.loss.temperature if s.cache.temperature is None else s.cache.temperature)
    spec = CacheSpec(int(s.cache.top_k), temperature, s.cache.precision, int(s.cache.records_per_shard))
    manifest = plan_manifest(s, tokenizer, files, spec, valence_k)
    target = Path(s.cache.dir)
    if target.exists() and not target.is_dir():
        raise VkdError(f"cache.dir ({s.cache.dir}) is a file, not a directory")
    writable = target if target.is_dir() else next(p for p in target.absolute().parents if p.exists())
    if not os.access(writable, os.W_OK | os.X_OK):
        raise VkdError(f"cache.dir ({s.cache.dir}): {writable} is not writable")
    existing = Path(s.cache.dir) / MANIFEST
    if existing.is_file():
        old = read_manifest(s.cache.dir, "cache.dir")
        if not same_plan(old, manifest):
            raise VkdError(
                f"cache.dir ({s.cache.dir}) holds a cache made with {describe_plan_difference(old, manifest)}: "
                "choose another cache.dir, or delete this one"
            )
    elif Path(s.cache.dir).is_dir() and any(Path(s.cache.dir).iterdir()):
        raise VkdError(f"cache.dir ({s.cache.dir}) is not empty and holds no teacher cache: choose another directory")
    return CachePlan(s, tokenizer, files, manifest, width)


def main(args: list[str]) -> None:
    """`python -m vkd_ds.teacher_cache [--job=cache-teacher] [overrides]` prints the FINGERPRINT_ENV
    value for a job that hashes teacher.path (cache-teacher; training that checks it against
    teacher.cache), hashing it here once; nothing for any other job. For scripts that start the ranks
    themselves: slurm/train.sbatch exports it before srun. A config it cannot read prints nothing
    (the ranks report it)."""
    from vkd_ds.config import compose
    from vkd_ds.launch import CACHE_TEACHER_FLAG
    from vkd_ds.settings import Settings

    cache_job = args[:1] == [CACHE_TEACHER_FLAG]
    try:
        s = Settings.from_config(compose(args[1:] if cache_job else args))
        teacher = s.teacher.path
        checked = cache_job or s.teacher.cache
        if teacher and checked and (Path(teacher) / "config.json").is_file():
            weights_fingerprint(teacher)
            print(fingerprint_env(teacher).get(FINGERPRINT_ENV, ""))
    except (VkdError, OSError, ValueError) as err:
        print(f"vkd-ds: teacher not hashed ahead ({str(err).splitlines()[0]}); each rank hashes it", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
