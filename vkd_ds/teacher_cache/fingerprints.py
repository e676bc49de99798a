"""Fingerprints of what a cache's values depend on: files by SHA-256, the teacher by its config and
one hash over its weight files, hashed once per job and handed to the ranks (FINGERPRINT_ENV)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path


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
