"""`python -m vkd_ds.teacher_cache [--job=cache-teacher] [overrides]`: the teacher hashed ahead for a
launch script (cli.main)."""

import sys

from vkd_ds.teacher_cache.cli import main

main(sys.argv[1:])
