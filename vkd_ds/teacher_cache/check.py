"""The checks made by training before anything runs: the cache of `teacher.cache` against the run."""

from __future__ import annotations

import math
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.teacher_cache.fingerprints import file_sha256, teacher_fingerprint
from vkd_ds.teacher_cache.manifest import read_manifest
from vkd_ds.teacher_cache.shards import check_shard
from vkd_ds.token_store import tokenizer_fingerprint


def check_for_training(
    settings, tokenizer, files: dict[str, tuple[str, list]], needs_valence: bool, teacher_tokenizer=None
) -> dict:
    """The cache of `teacher.cache`, checked against the run: teacher, tokenizer (and across tokenizers
    `teacher_tokenizer`, teacher.tokenizer_path's), data files, max_seq_len, temperature, valence, every
    shard's files. Its manifest; VkdError naming the first mismatch."""
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
    cached_teacher_tokenizer = m.get("teacher_tokenizer_sha256")
    if teacher_tokenizer is None and cached_teacher_tokenizer is not None:
        raise VkdError(
            f"{where} holds the teacher on its own tokens (made with teacher.tokenizer_path set), and this run "
            "has the teacher on the data's tokenizer: set teacher.tokenizer_path to the cache's teacher tokenizer"
        )
    if teacher_tokenizer is not None and cached_teacher_tokenizer != tokenizer_fingerprint(teacher_tokenizer):
        made = "another teacher tokenizer" if cached_teacher_tokenizer else "the teacher on the data's tokenizer"
        raise VkdError(
            f"{where} was made with {made} than teacher.tokenizer_path ({settings.teacher.tokenizer_path}): "
            "write a cache with this teacher.tokenizer_path (vkd-ds cache-teacher)"
        )
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
            check_shard(directory / split / shard["name"], shard, m)
    return m
