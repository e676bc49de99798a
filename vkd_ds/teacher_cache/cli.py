"""The command line of the cache: the flag of the cache writer's ranks, and `python -m
vkd_ds.teacher_cache` (the teacher hashed ahead, for launch scripts)."""

from __future__ import annotations

import sys
from pathlib import Path

from vkd_ds.errors import VkdError
from vkd_ds.teacher_cache.fingerprints import FINGERPRINT_ENV, fingerprint_env, weights_fingerprint

CACHE_TEACHER_FLAG = "--job=cache-teacher"  # the ranks of `vkd-ds cache-teacher` (first argument)


def main(args: list[str]) -> None:
    """`python -m vkd_ds.teacher_cache [--job=cache-teacher] [overrides]` prints the FINGERPRINT_ENV
    value for a job that hashes teacher.path (cache-teacher; training that checks it against
    teacher.cache), hashing it here once; nothing for any other job. For scripts that start the ranks
    themselves: slurm/train.sbatch exports it before srun. A config it cannot read prints nothing
    (the ranks report it)."""
    from vkd_ds.config import compose
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
