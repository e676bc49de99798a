"""The manifest (DIR/manifest.json): the plan of a cache before any shard is written (its
fingerprints, shards and bytes per position), read, written atomically, and compared."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.teacher_cache.fingerprints import file_sha256, teacher_fingerprint
from vkd_ds.teacher_cache.values import array_dtypes, bytes_per_position, valid_positions
from vkd_ds.token_store import tokenizer_fingerprint

FORMAT = "vkd-ds teacher cache v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's values are: settings that must match for a cache to serve a run."""

    top_k: int
    temperature: float
    precision: str
    records_per_shard: int


def plan_manifest(
    settings, tokenizer, files: dict[str, tuple[str, list]], spec: CacheSpec, valence_k: int | None, cross=None
):
    """The manifest of a cache of `files` ({split: (path, examples)}), before any shard is written.
    `cross` (a CrossVocab, across tokenizers): each record's positions are those of its teacher tokens
    (every teacher token with a next token; training aligns them), over the teacher's vocabulary."""
    vocab = len(tokenizer) if cross is None else cross.teacher_vocab

    def positions(example) -> int:
        return valid_positions(example.loss_mask) if cross is None else cross.teacher_positions(example.input_ids)

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
                    "positions": sum(positions(ex) for ex in chunk),
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
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),  # the data's: the records are its rows
        # Across tokenizers, the teacher's own (teacher.tokenizer_path), whose tokens the positions are.
        "teacher_tokenizer_sha256": None if cross is None else tokenizer_fingerprint(cross.teacher_tokenizer),
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
PLAN_KEYS = ("format", "teacher", "tokenizer_sha256", "teacher_tokenizer_sha256", "vocab_size", "max_seq_len")
PLAN_KEYS += ("top_k", "temperature")
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
        "teacher_tokenizer_sha256": "another teacher.tokenizer_path",
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
