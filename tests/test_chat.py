# ruff: noqa: E501  (the stock chat templates below keep their original long lines)
"""`messages` records (vkd_ds.chat): the assistant turns are the targets, located by character offsets in the
render of four stock chat templates, on real (small, offline-trained) fast tokenizers.

Run with -s to see each rendered conversation with its target spans marked «...».
"""

from __future__ import annotations

import functools
import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vkd_ds.assets import pydoc_records
from vkd_ds.chat import Rendered, check_messages, render, require_chat_template
from vkd_ds.errors import VkdError

# --- Stock chat templates, copied verbatim (only the string; nothing else of their sources) ----------------

# meta-llama/Llama-3.1-8B-Instruct (the same text ships with Llama-3.3-70B-Instruct; copied from llama.cpp's
# models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja).
LLAMA_31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct (ChatML; a default system prompt when the conversation has none).
QWEN_25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B (the hybrid-thinking Qwen3 template; copied from llama.cpp's models/templates/Qwen-Qwen3-0.6B.jinja).
# A turn after the last user query keeps its <think> block (the last turn gets an EMPTY one when it has no
# reasoning); earlier turns keep only their answer. `enable_thinking` only changes the generation prompt, which
# a training render does not add.
QWEN_3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# google/gemma-3-4b-it: the system prompt is folded into the first user turn, "assistant" is rendered "model",
# and roles must alternate (the template raises otherwise).
GEMMA_3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# --- Tokenizers: a byte-level BPE trained here, with each family's special tokens as the real ones mark them ----

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # added, not special
FAMILIES = {
    "llama-3.1": dict(
        template=LLAMA_31,
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        added=[],
        named=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        end="<|eot_id|>",
        scaffolding=[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "assistant",
            "user",
            "system",
            "Cutting Knowledge Date",
        ],
    ),
    "qwen2.5": dict(
        template=QWEN_25,
        specials=QWEN_SPECIALS,
        added=QWEN_ADDED,
        named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        end="<|im_end|>",
        scaffolding=["<|im_start|>", "assistant", "user", "system", "You are Qwen"],
    ),
    "qwen3": dict(
        template=QWEN_3,
        specials=QWEN_SPECIALS,
        added=[*QWEN_ADDED, "<think>", "</think>"],  # Qwen3 marks <think> and </think> as not special
        named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        end="<|im_end|>",
        scaffolding=["<|im_start|>", "assistant", "user", "system"],
    ),
    "gemma-3": dict(
        template=GEMMA_3,
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        added=[],
        named=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
        end="<end_of_turn>",
        scaffolding=["<bos>", "<start_of_turn>", "model", "user"],
    ),
}


@functools.cache
def _trained(family: str) -> str:
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pydoc_records()[:20], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    return tok.to_str()


def tokenizer(family: str, template: str | None = "stock") -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer of `family` with its stock chat template, or `template` (None: no template)."""
    spec = FAMILIES[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(family)), **spec["named"])
    tok.chat_template = spec["template"] if template == "stock" else template
    return tok


# --- Conversations and checks --------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
ASK_1 = {"role": "user", "content": "What is a list?"}
ANSWER_1 = "A list is a mutable sequence."
ASK_2 = {"role": "user", "content": "And a tuple?"}
ANSWER_2 = "A tuple is an immutable sequence."
REASONING_1 = "Lists can change in place."
REASONING_2 = "Tuples cannot change after they are made."
CONVERSATION = [
    SYSTEM,
    ASK_1,
    {"role": "assistant", "content": ANSWER_1},
    ASK_2,
    {"role": "assistant", "content": ANSWER_2},
]


def target_runs(rendered: Rendered, tok) -> list[str]:
    """The decoded text of each contiguous run of target tokens."""
    runs, run = [], []
    for token, target in zip(rendered.ids, rendered.targets, strict=True):
        if target:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r) for r in [*runs, run] if r]


def check(rendered: Rendered, tok, family: str, messages: list[dict], expected: list[str]) -> None:
    """The targets are exactly `expected` (the assistant texts as rendered, each with its end-of-turn token);
    no scaffolding or other turn is; the prompt is everything before the last assistant turn."""
    print(f"\n--- {family} ---\n{rendered.describe()}")
    runs = target_runs(rendered, tok)
    assert runs == expected
    assert rendered.text[rendered.spans[-1][0] : rendered.spans[-1][1]] == expected[-1]
    for run in runs:
        assert not any(piece in run for piece in FAMILIES[family]["scaffolding"]), run
        assert not any(m["content"].strip() in run for m in messages if m["role"] != "assistant"), run
    assert tok.decode(rendered.ids[: rendered.prompt_len]) == rendered.text[: rendered.spans[-1][0]]
    assert (
        rendered.targets[rendered.prompt_len] == 1
        and rendered.ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("family", ["llama-3.1", "qwen2.5", "qwen3", "gemma-3"])
@pytest.mark.parametrize("last_only", [False, True])
def test_targets_are_the_assistant_turns_and_their_end_token(family, last_only):
    tok = tokenizer(family)
    end = FAMILIES[family]["end"]
    rendered = render(CONVERSATION, tok, "train.jsonl:1", last_only=last_only)
    expected = [ANSWER_1 + end, ANSWER_2 + end]
    check(rendered, tok, family, CONVERSATION, expected[1:] if last_only else expected)
    assert SYSTEM["content"] in rendered.text  # rendered (Gemma: in the first user turn), never a target
    if family == "qwen3":  # the last turn's empty think block is scaffolding, not a target
        assert "<think>\n\n</think>\n\n" + ANSWER_2 in rendered.text
        assert "<think>" not in "".join(target_runs(rendered, tok))


@pytest.mark.parametrize("as_key", [False, True], ids=["think-in-content", "reasoning_content"])
def test_qwen3_reasoning_is_a_target_where_the_template_renders_it(as_key):
    """Both assistant turns carry reasoning; Qwen3 renders only the last one's (the first turn precedes the last
    user query): that block, from <think>, is a target; the first turn's answer alone is."""

    def reply(reasoning, answer):
        if as_key:
            return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}

    messages = [SYSTEM, ASK_1, reply(REASONING_1, ANSWER_1), ASK_2, reply(REASONING_2, ANSWER_2)]
    tok = tokenizer("qwen3")
    rendered = render(messages, tok, "train.jsonl:2")
    last = f"<think>\n{REASONING_2}\n</think>\n\n{ANSWER_2}<|im_end|>"
    check(rendered, tok, "qwen3", messages, [ANSWER_1 + "<|im_end|>", last])
    assert REASONING_1 not in rendered.text  # dropped by the template
    check(render(messages, tok, "train.jsonl:2", last_only=True), tok, "qwen3", messages, [last])


@pytest.mark.parametrize("family", ["llama-3.1", "qwen2.5", "qwen3"])
def test_a_tool_turn_is_never_a_target(family):
    """user, assistant, tool, assistant: the tool's output is context. Qwen3 keeps the reasoning of both turns
    (both follow the last user query: an agent's tool loop); Qwen2.5 adds its default system prompt; Llama
    renders the tool's string content through `tojson`, so it is not found verbatim (the cursor stays)."""
    thinks = family == "qwen3"
    first = f"<think>\n{REASONING_1}\n</think>\n\nLet me look it up." if thinks else "Let me look it up."
    messages = [
        {"role": "user", "content": "How warm is it in Paris?"},
        {"role": "assistant", "content": first},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    tok = tokenizer(family)
    rendered = render(messages, tok, "train.jsonl:3")
    end = FAMILIES[family]["end"]
    check(rendered, tok, family, messages, [first + end, "It is 21 degrees in Paris." + end])
    assert "temperature" in rendered.text and "temperature" not in "".join(target_runs(rendered, tok))


def test_a_reply_that_is_a_role_name_llama():
    """Llama's header "<|start_header_id|>assistant<|end_header_id|>" is itself text + a special token: a reply
    "assistant" matches there first; the reply is the match right after it."""
    messages = [{"role": "user", "content": "Say your role."}, {"role": "assistant", "content": "assistant"}]
    tok = tokenizer("llama-3.1")
    rendered = render(messages, tok, "train.jsonl:4")
    print(f"\n--- llama-3.1, a role-name reply ---\n{rendered.describe()}")
    assert target_runs(rendered, tok) == ["assistant<|eot_id|>"]
    assert rendered.text[: rendered.spans[0][0]].endswith("<|end_header_id|>\n\n")


def test_awkward_replies_qwen25():
    """A reply that also occurs in the next header ("assistant"), an empty user turn, and a reply with a trailing
    newline the template keeps (the newline and <|im_end|> are targets: the student learns to stop)."""
    messages = [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "Say it again."},
        {"role": "assistant", "content": "Sure.\n"},
    ]
    tok = tokenizer("qwen2.5")
    rendered = render(messages, tok, "train.jsonl:4")
    print(f"\n--- qwen2.5, awkward ---\n{rendered.describe()}")
    assert target_runs(rendered, tok) == ["assistant<|im_end|>", "Sure.\n<|im_end|>"]
    assert rendered.text[: rendered.spans[0][0]].endswith("<|im_start|>assistant\n")


# --- Refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("hello", '"messages" must be a non-empty list'),
        ([], '"messages" must be a non-empty list'),
        (["hi", {"role": "assistant", "content": "x"}], '"messages"[0] must be an object, got str'),
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], '"messages"[0] has no string "role"'),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
            '"messages"[1] has no string "content"',
        ),
        ([SYSTEM, ASK_1, {"role": "assistant"}], '"messages"[2] has no string "content"'),
        (
            [ASK_1, {"role": "assistant", "content": " \n"}],
            '"messages"[1] is an assistant turn with an empty "content"',
        ),
        (
            [ASK_1, {"role": "assistant", "content": "x", "reasoning_content": 3}],
            '"messages"[1] has a "reasoning_content"',
        ),
        ([SYSTEM, ASK_1], "the conversation has no assistant turn"),
    ],
)
def test_check_messages_refuses_malformed_conversations(value, message):
    with pytest.raises(VkdError) as err:
        check_messages(value, "train.jsonl:12")
    assert str(err.value).startswith("train.jsonl:12: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_no_chat_template():
    tok = tokenizer("qwen2.5", template=None)
    with pytest.raises(VkdError, match=r"`messages` records need .* chat template.* data\.tokenizer_path"):
        require_chat_template(tok)
    with pytest.raises(VkdError, match=r"teacher\.path"):
        require_chat_template(tok, key="teacher.path")
    with pytest.raises(VkdError, match="chat template"):
        render(CONVERSATION, tok, "train.jsonl:5")
    require_chat_template(tokenizer("qwen2.5"))  # a stock one passes


def test_a_template_that_rejects_the_conversation():
    """Gemma 3's template raises unless user and assistant turns alternate."""
    messages = [ASK_1, ASK_2, {"role": "assistant", "content": ANSWER_2}]
    with pytest.raises(
        VkdError,
        match=r"^train\.jsonl:6: the chat template rejects this conversation: Conversation roles must alternate",
    ):
        render(messages, tokenizer("gemma-3"), "train.jsonl:6")


def test_a_template_that_rewrites_assistant_text():
    template = "{% for m in messages %}{{ m.role }}: {{ m.content | upper }}<|im_end|>\n{% endfor %}"
    with pytest.raises(VkdError, match=r"^train\.jsonl:7: the chat template changes assistant turn 2's text"):
        render(CONVERSATION[:3], tokenizer("qwen2.5", template=template), "train.jsonl:7")


def test_a_non_assistant_turn_the_template_rewrites_is_skipped():
    """A user turn rendered in capitals is not found: the cursor stays, the assistant turn is still located.
    The token " A" straddles the header ("assistant: ") and the reply: it is a target (it must be predicted)."""
    template = "{% for m in messages %}{{ m.role }}: {{ m.content | upper if m.role == 'user' else m.content }}<|im_end|>\n{% endfor %}"
    tok = tokenizer("qwen2.5", template=template)
    rendered = render(CONVERSATION, tok, "train.jsonl:8")
    print(f"\n--- custom, capitalised users ---\n{rendered.describe()}")
    assert target_runs(rendered, tok) == [" " + ANSWER_1 + "<|im_end|>", " " + ANSWER_2 + "<|im_end|>"]
    assert rendered.spans == [
        (rendered.text.index(a), rendered.text.index(a) + len(a) + 10) for a in (ANSWER_1, ANSWER_2)
    ]


def test_a_slow_tokenizer_is_refused():
    class Slow:  # what a tokenizer without offsets (no `tokenizers` backend) reports
        is_fast = False
        chat_template = QWEN_25

    with pytest.raises(VkdError, match=r"^train\.jsonl:9: .*fast tokenizer"):
        render(CONVERSATION, Slow(), "train.jsonl:9")


def test_reasoning_without_an_answer_is_refused():
    messages = [ASK_1, {"role": "assistant", "content": f"<think>\n{REASONING_1}\n</think>\n\n"}]
    with pytest.raises(
        VkdError, match=r"^train\.jsonl:10: assistant turn 1 has reasoning but no answer after </think>"
    ):
        render(messages, tokenizer("qwen3"), "train.jsonl:10")


# --- Conversations as training data ----------------------------------------------------------------------------


def test_conversations_in_a_token_store_keep_their_assistant_targets(tmp_path):
    """`messages` records through the token store: each row's loss mask is the render's targets (all turns,
    or the last with data.assistant_turns=last, another store); text records alongside keep theirs."""
    from vkd_ds.token_store import open_split

    tok = tokenizer("qwen2.5")
    path = tmp_path / "chat.jsonl"
    records = [{"messages": CONVERSATION}, {"text": "A plain document among conversations."}]
    records.append({"messages": [ASK_1, {"role": "assistant", "content": ANSWER_1}], "valence": 0.75})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stores = {}
    for turns in ("all", "last"):
        rows = open_split(str(path), "data.train_path", tok, 512, str(tmp_path / "stores"), assistant_turns=turns)
        stores[turns] = rows.folder
        for row, record in zip(rows, records, strict=True):
            if "messages" not in record:
                assert row.loss_mask == [0] + [1] * (len(row.input_ids) - 1)
                continue
            rendered = render(record["messages"], tok, "chat", last_only=turns == "last")
            print(f"\n--- {turns} ---\n{rendered.describe()}")
            assert row.input_ids == rendered.ids and row.loss_mask == rendered.targets
            assert row.prompt_len == rendered.prompt_len
            assert row.valence == ([0.75] * len(row.input_ids) if "valence" in record else None)
        assert rows.manifest["counts"]["targets"] == sum(sum(r.loss_mask[1:]) for r in rows)
    assert stores["all"] != stores["last"]
    with pytest.raises(VkdError, match="data.assistant_turns=all, this run has last"):
        open_split(str(stores["all"]), "data.train_path", tok, 512, None, assistant_turns="last")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [ASK_1]}, "chat.jsonl:2: the conversation has no assistant turn"),
        ({"messages": CONVERSATION, "valence": [0.5]}, 'chat.jsonl:2: "valence" of a "messages" record must be one'),
        ({"messages": CONVERSATION, "text": "x"}, 'chat.jsonl:2: a record needs one of "text"'),
    ],
)
def test_bad_conversations_are_refused_with_their_line_and_nothing_is_published(record, message, tmp_path):
    from vkd_ds.token_store import open_split

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(VkdError, match=message.replace("[", r"\[")):
        open_split(str(path), "data.train_path", tokenizer("qwen2.5"), 512, str(tmp_path / "stores"))
    assert not list((tmp_path / "stores").glob("*"))


def test_conversations_need_a_tokenizer_with_a_chat_template(tmp_path):
    from vkd_ds.token_store import open_split

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(VkdError, match="need a tokenizer with a chat template"):
        open_split(str(path), "data.train_path", tokenizer("qwen2.5", template=None), 512, str(tmp_path / "s"))
    assert not list((tmp_path / "s").glob("*"))


# A template in the style of ChatML over the tiny assets' tokenizer: its EOS ends each turn.
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
)


def write_conversations(path, count: int, seed: int = 0) -> None:
    """`count` conversations of one or two exchanges cut from pydoc text: short, of spread lengths."""
    import random

    words = " ".join(pydoc_records()[:40]).split()
    rng = random.Random(seed)

    def say(low, high):
        start = rng.randrange(len(words) - high)
        return " ".join(words[start : start + rng.randint(low, high)])

    with path.open("w") as out:
        for _ in range(count):
            messages = [{"role": "system", "content": "Answer briefly."}]
            for _ in range(rng.choice([1, 1, 2])):
                messages += [{"role": "user", "content": say(3, 8)}, {"role": "assistant", "content": say(3, 20)}]
            out.write(json.dumps({"messages": messages}) + "\n")


def test_distilling_on_conversations_packed_with_on_policy_steps(tiny_assets, tmp_path):
    """Conversations end to end, 2 ranks: packed several to a row, the loss on the replies only, the
    on-policy steps sampling each conversation's last reply from the conversation before it."""
    from transformers import AutoTokenizer

    from tests.conftest import base_overrides, train_job
    from vkd_ds.metrics import read_metrics
    from vkd_ds.token_store import open_split

    tok = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tok.chat_template = TINY_TEMPLATE
    tok.save_pretrained(tmp_path / "tokenizer")
    write_conversations(tmp_path / "chat.jsonl", 120)
    write_conversations(tmp_path / "chat_valid.jsonl", 16, seed=1)
    run = tmp_path / "run"
    train_job(
        [
            *base_overrides(tiny_assets, run),
            f"data.train_path={tmp_path / 'chat.jsonl'}",
            f"data.valid_path={tmp_path / 'chat_valid.jsonl'}",
            f"data.tokenizer_path={tmp_path / 'tokenizer'}",
            "data.max_seq_len=128",
            "data.packing=true",
            "onpolicy.fraction=0.5",
            "seq_kd.n_gen=6",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
        ]
    )
    log = (run / "train.log").read_text()
    assert "data: packing:" in log
    rows = read_metrics(run / "metrics.csv")
    assert {r["onpolicy"] for r in rows} == {"0", "1"} and float(rows[-1]["eval/ce"]) > 0
    assert all(float(r["fill"]) > 0.8 for r in rows if r["onpolicy"] == "0")
    # The rows trained on: every target token is in an assistant reply (or its end of turn).
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    store = open_split(str(tmp_path / "chat.jsonl"), "data.train_path", loaded, 128, None)
    for row in store[:20]:
        targets = loaded.decode([t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m])
        assert "system:" not in targets and "user:" not in targets and "assistant:" not in targets
        assert row.prompt_len and loaded.decode(row.input_ids[: row.prompt_len]).rstrip().endswith("assistant:")


def test_fit_valence_head_labels_a_conversation_with_one_number():
    """`vkd-ds fit-valence-head`'s lexicon labels: a conversation takes the mean mood of its replies
    (per-token labels would not align with the rendered conversation), and then tokenizes as one row."""
    from vkd_ds.data import tokenize
    from vkd_ds.fit_head import label_records

    tok = tokenizer("qwen2.5")
    happy = [ASK_1, {"role": "assistant", "content": "A wonderful, lovely, excellent question; happy to help."}]
    records = [("c:1", {"messages": CONVERSATION}), ("c:2", {"messages": happy})]
    (_, plain), (_, glad) = label_records(records, tok, "auto", 0.8)
    assert isinstance(plain["valence"], float) and 0.0 <= plain["valence"] <= 1.0
    assert glad["valence"] > plain["valence"]
    rows = tokenize([("c:2", glad)], tok, 512)
    assert rows[0].valence == [glad["valence"]] * len(rows[0].input_ids)
    assert rows[0].loss_mask == render(happy, tok, "c:2").targets
