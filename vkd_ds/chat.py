"""Chat records: `{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the tokenizer's chat
template, with the assistant turns as the training targets.

The targets come from CHARACTER OFFSETS in the rendered text, not from `{% generation %}` tags: stock
templates (Llama 3.x, Qwen2.5, Qwen3, Gemma 3) have none, so transformers' `return_assistant_tokens_mask`
marks nothing on them. Each turn's content is looked up in the render, in order; an assistant turn's span
runs from its first character through the end-of-turn special token that follows it (so the student learns
to stop), and a token is a target when its character range overlaps a span.
"""

from __future__ import annotations

from dataclasses import dataclass

from vkd_ds.errors import VkdError, library_reason

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # Qwen3's (and DeepSeek-R1's) reasoning block


def check_messages(value, where: str) -> None:
    """Structure check of a record's "messages" value; `where` is e.g. "train.jsonl:12"."""
    if not isinstance(value, list) or not value:
        raise VkdError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    has_assistant = False
    for i, message in enumerate(value):
        at = f'"messages"[{i}]'
        if not isinstance(message, dict):
            raise VkdError(f"{where}: {at} must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise VkdError(f'{where}: {at} has no string "role"')
        if not isinstance(message.get("content"), str):
            raise VkdError(f'{where}: {at} has no string "content"')
        if message.get("reasoning_content") is not None and not isinstance(message["reasoning_content"], str):
            raise VkdError(f'{where}: {at} has a "reasoning_content" that is not a string')
        if message["role"] == "assistant":
            has_assistant = True
            # An empty reply has no text to find in the render, and nothing to teach.
            if not message["content"].strip():
                raise VkdError(f'{where}: {at} is an assistant turn with an empty "content"')
    if not has_assistant:
        raise VkdError(f"{where}: the conversation has no assistant turn")


def require_chat_template(tokenizer, key: str = "data.tokenizer_path") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise VkdError(
            f"`messages` records need a tokenizer with a chat template, and the tokenizer that {key} names "
            "has none (set one in its tokenizer_config.json, or use a model's instruct tokenizer)"
        )


@dataclass
class Rendered:
    text: str  # the template's output
    spans: list[tuple[int, int]]  # [start, stop) character spans of the targets in `text`
    ids: list[int]  # token ids of `text`, without added special tokens (the template writes BOS itself)
    targets: list[int]  # 1 where ids[t] is a training target, else 0
    prompt_len: int  # tokens before the first target token of the last assistant turn

    def describe(self) -> str:
        """The rendered conversation with each target span wrapped in «...», under a one-line summary."""
        parts, at = [], 0
        for start, stop in self.spans:
            parts += [self.text[at:start], "«", self.text[start:stop], "»"]
            at = stop
        parts.append(self.text[at:])
        head = f"{len(self.ids)} tokens, {sum(self.targets)} targets, prompt_len {self.prompt_len}"
        return head + "\n" + "".join(parts)


def render(messages: list[dict], tokenizer, where: str, last_only: bool = False) -> Rendered:
    """Render a conversation and mark its assistant turns (only the last one with `last_only`) as targets."""
    check_messages(messages, where)
    require_chat_template(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise VkdError(f"{where}: `messages` records need a fast tokenizer (character offsets); this one is slow")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # the template is user code: raise_exception(), undefined names, type errors
        raise VkdError(f"{where}: the chat template rejects this conversation: {library_reason(err)}") from err

    specials = _special_tokens(tokenizer)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            # Never a target; only moves the cursor past its text. A template may transform it (then it is not
            # found and the cursor stays), and an empty content would match anywhere, so it is skipped.
            content = message["content"].strip()
            at = text.find(content, cursor) if content else -1
            cursor = at + len(content) if at >= 0 else cursor
            continue
        reasoning, answer = _split_reasoning(message)
        if not answer:
            raise VkdError(f"{where}: assistant turn {i} has reasoning but no answer after {THINK_CLOSE}")
        at = _find_reply(text, answer, cursor, specials)
        if at < 0:
            raise VkdError(
                f"{where}: the chat template changes assistant turn {i}'s text; its targets cannot be located"
            )
        # The span starts at the think block where the template rendered this turn's reasoning (it is what
        # the assistant says), else at the answer: an empty `<think>\n\n</think>\n\n` the template inserts
        # (Qwen3, last turn without reasoning) is scaffolding, not a target.
        start = _reasoning_start(text, reasoning, cursor, at) if reasoning else None
        stop = at + len(answer)
        stop += _end_token_len(text, stop, specials)
        spans.append((at if start is None else start, stop))
        cursor = stop
    if last_only:
        spans = spans[-1:]

    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise VkdError(f"{where}: `messages` records need a fast tokenizer (character offsets)") from err
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    targets = [int(any(a < stop and b > start for start, stop in spans)) for a, b in offsets]
    last_start, last_stop = spans[-1]
    prompt_len = next(t for t, (a, b) in enumerate(offsets) if a < last_stop and b > last_start)
    return Rendered(text=text, spans=spans, ids=ids, targets=targets, prompt_len=prompt_len)


def _special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens, longest first (so a match is the whole token, not a prefix of it)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    tokens.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _end_token_len(text: str, at: int, specials: list[str]) -> int:
    """Characters of the end-of-turn marker at `at`: whitespace the template kept (an untrimmed reply's
    trailing newline) followed by one special token; 0 when no special token follows."""
    token_at = at
    while token_at < len(text) and text[token_at].isspace():
        token_at += 1
    for token in specials:
        if text.startswith(token, token_at):
            return token_at - at + len(token)
    return 0


def _find_reply(text: str, answer: str, cursor: int, specials: list[str]) -> int:
    """Where an assistant's text starts in the render, at or after `cursor`. The first occurrence followed by
    an end-of-turn token wins: a short reply (say "a") also occurs in the next header ("assistant")."""
    first = at = text.find(answer, cursor)
    while at >= 0:
        if end := _end_token_len(text, at + len(answer), specials):
            # Llama's header is text + a special token ("assistant<|end_header_id|>"): a reply "assistant" first
            # matches there, and the reply itself is the match right after it.
            after = at + len(answer) + end
            again = len(text) - len(text[after:].lstrip())
            if text.startswith(answer, again) and _end_token_len(text, again + len(answer), specials):
                return again
            return at
        at = text.find(answer, at + 1)
    return first


def _split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant turn, split as Qwen3's template does: a `reasoning_content` key,
    else a `<think>...</think>` block leading the content. No reasoning -> ("", content)."""
    content = message["content"]
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"].strip(), content.strip()
    if THINK_CLOSE not in content:
        return "", content.strip()
    reasoning = content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1]
    return reasoning.strip(), content.split(THINK_CLOSE)[-1].strip()


def _reasoning_start(text: str, reasoning: str, cursor: int, answer_at: int) -> int | None:
    """Where this turn's rendered think block starts (its `<think>`, else the reasoning itself), or None when
    the template dropped the reasoning (Qwen3 keeps it only for turns after the last user query)."""
    at = text.rfind(reasoning, cursor, answer_at)
    if at < 0 or text[at + len(reasoning) : answer_at].strip() != THINK_CLOSE:
        return None
    open_at = text.rfind(THINK_OPEN, cursor, at)
    return open_at if open_at >= 0 and not text[open_at + len(THINK_OPEN) : at].strip() else at
