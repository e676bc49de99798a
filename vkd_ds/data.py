"""Records, examples and batches: record checks with file:line errors, tokenization of small
in-memory record lists (`vkd-ds fit-valence-head`), collation, resumable sampling. Training reads
its rows from a token store (vkd_ds.token_store), which applies the same rules.

A record is `{"text": ...}`, `{"prompt": ..., "completion": ...}` (the loss
covers the completion only) or `{"messages": [{"role": ..., "content": ...}, ...]}`
(a conversation rendered with the tokenizer's chat template, the loss on the
assistant turns: vkd_ds.chat), with an optional `"valence"` label in [0, 1]: one
number for the whole sequence, or (text and pairs) a list with one number per
token of the text (of prompt + completion), as the tokenizer encodes it without
special tokens. `vkd-ds fit-valence-head` fits the teacher's valence head on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkd_ds.errors import VkdError


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where token t is a training target (predicted from t-1)
    source: str  # "file:line", for messages
    valence: list[float] | None = None  # the label of each token (special tokens copy a neighbour's)
    prompt_len: int | None = None  # tokens of BOS + prompt, for prompt/completion records
    index: int = -1  # the row's key in its token store (TokenRows.key_base + row), -1 if none


def check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise VkdError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    has_text = "text" in record
    has_pair = "prompt" in record or "completion" in record
    has_messages = "messages" in record
    if has_text + has_pair + has_messages != 1:
        raise VkdError(f'{where}: a record needs one of "text", "prompt" + "completion", or "messages"')
    if has_messages:
        from vkd_ds.chat import check_messages

        check_messages(record["messages"], where)
        if isinstance(record.get("valence"), list):
            raise VkdError(f'{where}: "valence" of a "messages" record must be one number (no per-token labels)')
    keys = ("text",) if has_text else ("prompt", "completion") if has_pair else ()
    for key in keys:
        if not isinstance(record.get(key), str):
            raise VkdError(f'{where}: "{key}" must be a string')
    if "valence" in record:
        _check_valence(record["valence"], where)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_valence(value, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise VkdError(f'{where}: "valence" is an empty list')
    for j, v in enumerate(values):
        at = f'"valence"[{j}]' if isinstance(value, list) else '"valence"'
        if not _is_number(v):
            raise VkdError(f"{where}: {at} must be a number in [0, 1], got {v!r}")
        if not math.isfinite(v):
            raise VkdError(f"{where}: {at} is not finite ({v})")
        if not 0.0 <= v <= 1.0:
            raise VkdError(f"{where}: {at} = {v} is outside [0, 1]")


def windows(length: int, max_seq_len: int) -> list[tuple[int, int]]:
    """[start, stop) of the rows of a text document of `length` tokens: consecutive windows of
    max_seq_len that overlap by one token (each window's first token is its context, not a target),
    so every token from 1 on is a target of exactly one window."""
    if length <= max_seq_len:
        return [(0, length)]
    spans, start = [], 0
    while start + 1 < length:
        spans.append((start, min(start + max_seq_len, length)))
        start += max_seq_len - 1
    return spans


def record_texts(record: dict) -> list[str]:
    """The texts of a record the tokenizer encodes, in order: its text, or its prompt and completion
    (none for a conversation, which is rendered whole: `chat_document`)."""
    if "messages" in record:
        return []
    return [record["text"]] if "text" in record else [record["prompt"], record["completion"]]


@dataclass
class Document:
    """A record's tokens (BOS, body, EOS of a pair), their labels and the rows they make."""

    ids: list[int]
    labels: list[float] | None
    spans: list[tuple[int, int]]  # [start, stop) of each row
    target_from: int  # in each row, loss_mask[t] = t >= target_from
    prompt_len: int | None  # BOS + prompt of a prompt/completion record (of a conversation: up to its last reply)
    cut: int  # tokens of a pair (or a conversation) past max_seq_len, dropped
    targets: list[int] | None = None  # a conversation's: 1 on its assistant turns (target_from then unused)


def document(record: dict, parts: list[list[int]], bos: list[int], eos: list[int], max_seq_len: int, where: str):
    """The rows of a record whose record_texts encode to `parts`: a text longer than max_seq_len
    becomes windows (`windows`), a prompt/completion pair is cut at max_seq_len."""
    if "text" in record:
        (body,) = parts
        ids = bos + body
        labels = token_valence(record["valence"], body, bos, [], where) if "valence" in record else None
        # The first token of a window has no predecessor in it, so it is never a target.
        return Document(ids, labels, windows(len(ids), max_seq_len), 1, None, 0)
    prompt, completion = parts
    body = prompt + completion
    ids = bos + body + eos
    labels = token_valence(record["valence"], body, bos, eos, where) if "valence" in record else None
    cut = max(0, len(ids) - max_seq_len)
    ids, labels = ids[:max_seq_len], labels and labels[:max_seq_len]
    target_from = len(bos) + len(prompt)
    return Document(ids, labels, [(0, len(ids))], target_from, min(target_from, len(ids)) or None, cut)


def chat_document(record: dict, tokenizer, max_seq_len: int, where: str, last_only: bool) -> Document:
    """A `messages` record's one row: the conversation as the chat template renders it, its assistant
    turns (or only the last, `last_only`) the targets, cut at max_seq_len like a prompt/completion pair."""
    from vkd_ds.chat import render

    rendered = render(record["messages"], tokenizer, where, last_only)
    ids, targets = rendered.ids[:max_seq_len], rendered.targets[:max_seq_len]
    labels = [float(record["valence"])] * len(ids) if "valence" in record else None
    first = next((t for t, flag in enumerate(targets) if flag), len(ids))
    # The prompt of on-policy steps and sequence KD: everything before the last reply that was kept
    # (the conversation's last one unless the cut dropped it).
    starts = [t for t, flag in enumerate(targets) if flag and (t == 0 or not targets[t - 1])]
    prompt_len = starts[-1] if starts else None
    cut = max(0, len(rendered.ids) - max_seq_len)
    return Document(ids, labels, [(0, len(ids))], first, prompt_len, cut, targets)


def row_mask(length: int, target_from: int) -> list[int]:
    return [0] * min(target_from, length) + [1] * max(0, length - target_from)


def tokenize(
    records: list[tuple[str, dict]], tokenizer, max_seq_len: int, assistant_turns: str = "all"
) -> list[Example]:
    """Token ids and loss masks of small in-memory record lists, by the token store's rules (`document`)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for where, record in records:
        if "messages" in record:
            doc = chat_document(record, tokenizer, max_seq_len, where, assistant_turns == "last")
        else:
            parts = [tokenizer.encode(text, add_special_tokens=False) for text in record_texts(record)]
            doc = document(record, parts, bos, eos, max_seq_len, where)
        if len(doc.ids) < 2:
            raise VkdError(f"{where}: the record tokenizes to fewer than 2 tokens")
        for w, (a, b) in enumerate(doc.spans):
            source = where if w == 0 else f"{where} (window {w + 1})"
            labels = doc.labels[a:b] if doc.labels is not None else None
            mask = doc.targets[a:b] if doc.targets is not None else row_mask(b - a, doc.target_from)
            examples.append(Example(doc.ids[a:b], mask, source, labels, doc.prompt_len))
    return examples


def token_valence(value, body: list[int], bos: list[int], tail: list[int], where: str) -> list[float]:
    """One label per token of bos + body + tail: BOS takes the first label, EOS the last."""
    if not isinstance(value, list):
        return [float(value)] * (len(bos) + len(body) + len(tail))
    if len(value) != len(body):
        raise VkdError(
            f'{where}: "valence" has {len(value)} values but the text has {len(body)} tokens '
            "(one value per token, as the tokenizer encodes the text without special tokens)"
        )
    values = [float(v) for v in value]
    return values[:1] * len(bos) + values + values[-1:] * len(tail)


def is_empty(record: dict) -> bool:
    """A record with nothing to learn from: blank "text", or a blank prompt and completion."""
    if "text" in record:
        return not record["text"].strip()
    if "messages" in record:
        return False  # check_messages refused a conversation without a reply to learn
    return not (record["prompt"].strip() or record["completion"].strip())


def collate_packed(examples: list[Example], pad_id: int, rows: list[int]) -> dict[str, torch.Tensor]:
    """A packed micro-batch (data.packing): `rows[j]` documents one after another in row j, right-padded
    to the fullest row. `position_ids` restart at 0 for each document (and for the padding), which is
    how transformers confines attention to a document (sequences.model_inputs); `sequence[r, t]` is
    the document of each position (-1 on padding), `row` one store key per document. A document's
    first token is never a target: nothing of its own precedes it."""
    if sum(rows) != len(examples):
        raise ValueError(f"{len(examples)} documents for packed rows of {rows}")
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + n)
    groups = [examples[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    length = max(sum(len(ex.input_ids) for ex in group) for group in groups)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    position_ids = torch.zeros(shape, dtype=torch.long)  # restarting per document; 0 on padding
    sequence = torch.full(shape, -1, dtype=torch.long)
    doc = 0
    for r, group in enumerate(groups):
        at = 0
        for ex in group:
            n = len(ex.input_ids)
            input_ids[r, at : at + n] = torch.tensor(ex.input_ids)
            loss_mask[r, at + 1 : at + n] = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            position_ids[r, at : at + n] = torch.arange(n)
            sequence[r, at : at + n] = doc
            at, doc = at + n, doc + 1
        attention_mask[r, :at] = 1
        # Padding at position 0 (each pad then stands alone): its positions never exceed a document's,
        # where a row (data.pack_length) may be longer than the model's context.
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "sequence": sequence,
        "row": torch.tensor([ex.index for ex in examples], dtype=torch.long),
    }


def collate(examples: list[Example], pad_id: int, valence_k: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. `loss_mask[b, t]` marks target tokens t >= 1.

    With `valence_k`, also the valence targets of labelled sequences: `valence_target[b, t]` =
    the labels of tokens t+1..t+k (the last label repeated past the end), `valence_mask[b, t]`
    true where position t of a labelled sequence has a next token.
    """
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
    # Each row's key in its token store: where a teacher cache finds the row's stored outputs.
    row_keys = torch.tensor([ex.index for ex in examples], dtype=torch.long)
    batch_out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "row": row_keys}
    if valence_k is not None:
        target = torch.zeros((batch, length, valence_k))
        valence_mask = torch.zeros((batch, length), dtype=torch.bool)
        for row, ex in enumerate(examples):
            if ex.valence is not None:
                target[row, : len(ex.valence)] = future_trajectory(ex.valence, valence_k)
                valence_mask[row, : len(ex.valence) - 1] = True
        batch_out["valence_target"] = target
        batch_out["valence_mask"] = valence_mask
    return batch_out


def future_trajectory(values: Sequence[float], k: int) -> torch.Tensor:
    """[n, k]: row t holds values[t+1 .. t+k], the last value repeated past the end (docs/objective.md, Valence)."""
    v = torch.tensor(values, dtype=torch.float32)
    n = v.numel()
    index = (torch.arange(n)[:, None] + 1 + torch.arange(k)[None, :]).clamp(max=n - 1)
    return v[index]


class GlobalBatchSampler:
    """Deterministic, resumable assignment of examples to (step, micro-step, rank).

    The data is an endless stream of epochs, each a permutation seeded by
    (seed, epoch). Optimizer step s consumes stream positions
    [s*G, (s+1)*G) with G = micro * accum * world; within a micro-step the ranks
    take consecutive slices. So one rank with micro-batch 2b sees exactly the
    concatenation of what two ranks with b see, and the position to resume from
    is just the step.

    With a `mixture` ([(first, stop, weight)] row ranges of weighted sources), an epoch holds as
    many rows as the data, source i's share of them in proportion to its weight: its rows come from
    its own endless stream of permutations (repeated where it is up-weighted, a new subset each
    epoch where it is down-weighted), and the epoch's rows are shuffled together.
    """

    def __init__(
        self,
        num_examples: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        seed: int,
        mixture: list[tuple[int, int, float]] | None = None,
    ):
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.world = world_size
        self.seed = seed
        self.mixture = mixture
        self.num_examples = num_examples
        if mixture:
            total = sum(w for _, _, w in mixture)
            self.shares = [max(1, round(num_examples * w / total)) for _, _, w in mixture]
            self.num_examples = sum(self.shares)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def global_batch_size(self) -> int:
        return self.micro * self.accum * self.world

    def _permutation(self, n: int, seed: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def _mixture_epoch(self, epoch: int) -> torch.Tensor:
        parts = []
        for i, ((first, stop, _), share) in enumerate(zip(self.mixture, self.shares, strict=True)):
            size = stop - first
            positions = torch.arange(epoch * share, (epoch + 1) * share)
            rounds, offsets = positions // size, positions % size
            rows = torch.empty(share, dtype=torch.long)
            for r in rounds.unique().tolist():
                chosen = rounds == r
                rows[chosen] = self._permutation(size, (self.seed * 1_000_003 + i) * 1_000_003 + r)[offsets[chosen]]
            parts.append(rows + first)
        combined = torch.cat(parts)
        return combined[self._permutation(combined.numel(), self.seed * 1_000_003 + epoch)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._perm_epoch:
            if self.mixture:
                self._perm = self._mixture_epoch(epoch)
            else:
                self._perm = self._permutation(self.num_examples, self.seed * 1_000_003 + epoch)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.global_batch_size + (micro_step * self.world + rank) * self.micro
        return [self._index(p) for p in range(start, start + self.micro)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.num_examples


def global_batch_order(gathered: torch.Tensor) -> torch.Tensor:
    """[world, accum, micro, ...] (what all_gather of each rank's [accum, micro, ...] gives) ->
    [world·accum·micro, ...] in stream order, (micro-step, rank, row): the order in which one rank
    holding the concatenated global batch would see it (GlobalBatchSampler.indices)."""
    world, accum, micro = gathered.shape[:3]
    return gathered.transpose(0, 1).reshape(world * accum * micro, *gathered.shape[3:])


def rank_rows(global_values: torch.Tensor, accum: int, world: int, rank: int) -> torch.Tensor:
    """The inverse of global_batch_order for one rank: its [accum, micro, ...] rows of the global batch."""
    micro = global_values.shape[0] // (accum * world)
    if micro * accum * world != global_values.shape[0]:
        raise ValueError(f"{global_values.shape[0]} rows do not split into {accum} micro-steps x {world} ranks")
    return global_values.view(accum, world, micro, *global_values.shape[1:])[:, rank]


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
