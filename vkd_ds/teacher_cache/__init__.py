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

from vkd_ds.teacher_cache.check import check_for_training
from vkd_ds.teacher_cache.cli import CACHE_TEACHER_FLAG, main
from vkd_ds.teacher_cache.fingerprints import (
    FINGERPRINT_ENV,
    WEIGHT_SUFFIXES,
    file_sha256,
    fingerprint_env,
    teacher_fingerprint,
    weights_fingerprint,
)
from vkd_ds.teacher_cache.manifest import (
    FORMAT,
    MANIFEST,
    PLAN_KEYS,
    SPLITS,
    CacheSpec,
    describe_plan_difference,
    plan_manifest,
    read_manifest,
    same_plan,
    write_json_atomic,
)
from vkd_ds.teacher_cache.prepare import CachePlan, prepare_cache
from vkd_ds.teacher_cache.reader import MAX_OPEN_SHARDS, CachedTeacher
from vkd_ds.teacher_cache.values import (
    PRECISIONS,
    array_dtypes,
    bytes_per_position,
    id_dtype,
    teacher_rows,
    valid_positions,
)
from vkd_ds.teacher_cache.writer import assign_shards, write_cache

__all__ = [
    "CACHE_TEACHER_FLAG",
    "FINGERPRINT_ENV",
    "FORMAT",
    "MANIFEST",
    "MAX_OPEN_SHARDS",
    "PLAN_KEYS",
    "PRECISIONS",
    "SPLITS",
    "WEIGHT_SUFFIXES",
    "CachePlan",
    "CacheSpec",
    "CachedTeacher",
    "array_dtypes",
    "assign_shards",
    "bytes_per_position",
    "check_for_training",
    "describe_plan_difference",
    "file_sha256",
    "fingerprint_env",
    "id_dtype",
    "main",
    "plan_manifest",
    "prepare_cache",
    "read_manifest",
    "same_plan",
    "teacher_fingerprint",
    "teacher_rows",
    "valid_positions",
    "weights_fingerprint",
    "write_cache",
    "write_json_atomic",
]
