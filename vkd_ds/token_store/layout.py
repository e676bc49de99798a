"""What a token store is on disk: its format, the row layout, fingerprints, windows, its notes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "vkd-ds token store v2"  # v2: per-token targets of conversations (targets.bin, tstart)
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
        ("tstart", "<i8"),  # its first token's target flag in targets.bin (-1: loss_mask[t] = t >= target_from)
    ]
)
SAMPLE_BYTES = 1 << 20  # the head and tail of each input that its fingerprint hashes
VALID_KEY_BASE = 1 << 40  # Example.index of held-out rows: row + this (training rows: the row)


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
    # The chat template decides how a conversation becomes tokens and which of them are targets.
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256((text + json.dumps(special) + json.dumps(template)).encode()).hexdigest()


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
    return {"parts": entries}


def fingerprint(
    files: list[str], tokenizer_sha256: str, max_seq_len: int, assistant_turns: str = "all"
) -> tuple[str, dict]:
    """The store's key, and what it is computed from (recorded in the manifest)."""
    what = {
        "format": FORMAT,
        "inputs": [input_fingerprint(f) for f in files],
        "tokenizer_sha256": tokenizer_sha256,
        "max_seq_len": int(max_seq_len),
        "assistant_turns": assistant_turns,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest(), what


NOTE_TEXT = {
    "empty": "skipped {n} record(s) with empty text (first: {first})",
    "short": "skipped {n} record(s) that tokenize to fewer than 2 tokens (first: {first})",
    "cut": "cut {n} prompt/completion or messages record(s) longer than data.max_seq_len, {tokens} tokens dropped "
    "(first: {first})",
    "prompt_only": "{n} record(s) have no target token after the cut to data.max_seq_len (their prompt "
    "fills it; first: {first}); they add nothing to the loss",
}


def describe_notes(counts: dict) -> list[str]:
    return [
        NOTE_TEXT[reason].format(n=n, first=first, tokens=counts.get("cut_tokens", 0))
        for reason, (n, first) in counts.get("skipped", {}).items()
    ]
