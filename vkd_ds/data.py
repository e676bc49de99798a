"""JSONL data: parsing with file:line errors, tokenization, batching, resumable sampling.

A record is `{"text": ...}` or `{"prompt": ..., "completion": ...}` (the loss
covers the completion only), with an optional `"valence"` (a number, or one
number per token), accepted now and read by the valence terms (issue #3).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vkd_ds.errors import VkdError


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where token t is a training target (predicted from t-1)
    source: str  # "file:line", for messages


def _where(path: Path, line_no: int) -> str:
    return f"{path}:{line_no}"


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """Parse a JSONL file into (file:line, record) pairs; one clear error for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise VkdError(f"data file not found: {path}")
    records = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = _where(path, line_no)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise VkdError(f"{where}: not valid UTF-8 (byte {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VkdError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            _check_record(record, where)
            records.append((where, record))
    if not records:
        raise VkdError(f"data file {path} holds no records")
    return records


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise VkdError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    has_text = "text" in record
    has_pair = "prompt" in record or "completion" in record
    if has_text == has_pair:
        raise VkdError(f'{where}: a record needs either "text" or "prompt" + "completion"')
    keys = ("text",) if has_text else ("prompt", "completion")
    for key in keys:
        if not isinstance(record.get(key), str):
            raise VkdError(f'{where}: "{key}" must be a string')
    if has_text and not record["text"].strip():
        raise VkdError(f'{where}: "text" is empty')


def tokenize(records: list[tuple[str, dict]], tokenizer, max_seq_len: int) -> list[Example]:
    """Token ids and loss masks; sequences longer than max_seq_len are truncated."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    examples = []
    for where, record in records:
        if "text" in record:
            ids = bos + tokenizer.encode(record["text"], add_special_tokens=False)
            # The first token has no predecessor, so it is never a target.
            mask = [0] + [1] * (len(ids) - 1)
        else:
            prompt = bos + tokenizer.encode(record["prompt"], add_special_tokens=False)
            completion = tokenizer.encode(record["completion"], add_special_tokens=False)
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
            ids = prompt + completion
            mask = [0] * len(prompt) + [1] * len(completion)
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if len(ids) < 2:
            raise VkdError(f"{where}: the record tokenizes to fewer than 2 tokens")
        examples.append(Example(ids, mask, where))
    return examples


def load_examples(path: str | Path, tokenizer, max_seq_len: int) -> list[Example]:
    return tokenize(read_jsonl(path), tokenizer, max_seq_len)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. `loss_mask[b, t]` marks target tokens t >= 1."""
    length = max(len(ex.input_ids) for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class GlobalBatchSampler:
    """Deterministic, resumable assignment of examples to (step, micro-step, rank).

    The data is an endless stream of epochs, each a permutation seeded by
    (seed, epoch). Optimizer step s consumes stream positions
    [s*G, (s+1)*G) with G = micro * accum * world; within a micro-step the ranks
    take consecutive slices. So one rank with micro-batch 2b sees exactly the
    concatenation of what two ranks with b see, and the position to resume from
    is just the step.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.world = world_size
        self.seed = seed
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def global_batch_size(self) -> int:
        return self.micro * self.accum * self.world

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.global_batch_size + (micro_step * self.world + rank) * self.micro
        return [self._index(p) for p in range(start, start + self.micro)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.num_examples


def eval_shards(
    num_examples: int, batch_size: int, world_size: int, rank: int, max_batches: int | None
) -> list[list[int | None]]:
    """Held-out micro-batches of this rank. Every rank gets the same number of
    batches (ZeRO-3 forwards are collective); `None` entries are padding."""
    per_rank = math.ceil(num_examples / world_size)
    num_batches = math.ceil(per_rank / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    batches = []
    for b in range(num_batches):
        batch = []
        for j in range(batch_size):
            idx = (b * batch_size + j) * world_size + rank
            batch.append(idx if idx < num_examples else None)
        batches.append(batch)
    return batches
