"""The checks of `vkd-ds cache-teacher` before its ranks start: the plan they all write."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.teacher_cache.manifest import (
    MANIFEST,
    CacheSpec,
    describe_plan_difference,
    plan_manifest,
    read_manifest,
    same_plan,
)


@dataclass
class CachePlan:
    settings: object
    tokenizer: object
    files: dict[str, tuple[str, list]]
    manifest: dict
    teacher_width: int
    cross: object = None  # a CrossVocab across tokenizers (teacher.tokenizer_path): the teacher's own tokens


def prepare_cache(cfg) -> CachePlan:
    """Every check of `vkd-ds cache-teacher`, with no side effects: the settings, the teacher,
    tokenizer and data, `cache.*`, and a cache dir that holds either nothing or this same cache."""
    from vkd_ds.cross_tokenizer import check_records, cross_vocab
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
    cross = cross_vocab(s, tokenizer)
    teacher_vocab = len(tokenizer) if cross is None else cross.teacher_vocab
    check_vocab(teacher_vocab, teacher_config.vocab_size, f"teacher ({s.teacher.path})")
    files = open_splits(s.data, tokenizer)
    if cross is not None:
        check_records(files)
    width = hidden_width(teacher_config)
    valence_k = None
    if s.valence.teacher_head and cross is None:  # across tokenizers nothing reads the teacher's valence
        load_head(s.valence.teacher_head, int(s.valence.k), width)
        valence_k = int(s.valence.k)
    temperature = float(s.loss.temperature if s.cache.temperature is None else s.cache.temperature)
    spec = CacheSpec(int(s.cache.top_k), temperature, s.cache.precision, int(s.cache.records_per_shard))
    manifest = plan_manifest(s, tokenizer, files, spec, valence_k, cross)
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
    return CachePlan(s, tokenizer, files, manifest, width, cross)
