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

from vkd_ds.token_store.layout import (
    FORMAT,
    MANIFEST,
    ROW_DTYPE,
    VALID_KEY_BASE,
    default_store_dir,
    fingerprint,
    id_dtype,
    tokenizer_fingerprint,
)
from vkd_ds.token_store.reader import TokenRows, is_store, open_split, open_splits, read_store_manifest
from vkd_ds.token_store.writer import prepare_store

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ROW_DTYPE",
    "VALID_KEY_BASE",
    "TokenRows",
    "default_store_dir",
    "fingerprint",
    "id_dtype",
    "is_store",
    "open_split",
    "open_splits",
    "prepare_store",
    "read_store_manifest",
    "tokenizer_fingerprint",
]
