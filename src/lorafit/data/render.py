"""Conversation -> token ids and labels, through the tokenizer's chat template.

Labels come from the rendered conversation itself, never from a second hand-written format: for each
assistant message we render the conversation up to it (with the generation prompt, exactly what
inference feeds the model) and up to and including it. Both renderings, tokenized, must be token
prefixes of the whole conversation's tokens; the assistant span is the tokens between them. When a
template rewrites history (drops earlier reasoning, moves a system prompt) or the text at a boundary
merges into one token (a reply starting with two spaces or newlines, under byte-level BPE), the
prefix property breaks and the record is rejected with a reason saying which of the two happened,
rather than silently training on misaligned labels.

Inside a span, the reply and its end-of-turn token (``<|im_end|>``, ``</s>``, ``<|eot_id|>``...) are
labelled, so the model learns to stop even when pad == eos (padding is masked later by position,
never by token id). Glue the template puts after the end-of-turn token (a newline) is not labelled.

BOS is added exactly when the tokenizer itself adds it and the rendered text does not already start
with it, so a template that writes ``{{ bos_token }}`` and a tokenizer that adds BOS never double it.

Whatever reaches the renderer (from the readers, chat, generate or the server) is checked first: a
conversation is a non-empty list of ``{"role": str, "content": str}`` objects, and the rendered text
must be valid Unicode. Anything else is a `BadRecordError` saying which message, never another
exception from deep inside the template engine or the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.data.errors import BadRecordError
from lorafit.data.json_records import is_text
from lorafit.data.templates import end_of_turn_token_ids

IGNORE_INDEX = -100
TRAIN_ON_CHOICES = ("all_assistant", "last_assistant", "all")


@dataclass
class AssistantTurn:
    """Token positions of one assistant turn inside `RenderedConversation.input_ids`."""

    prompt_start: int  # first token after the previous turn: system/user/tool text and the header
    response_start: int  # first token of the reply
    response_end: int  # just after the end-of-turn token (or the span's end when there is none)
    turn_end: int  # just after template glue that follows the end-of-turn token


@dataclass
class RenderedConversation:
    input_ids: list[int]
    turns: list[AssistantTurn] = field(default_factory=list)
    response_cut: bool = False  # a reply lost its end of turn to truncation


def check_messages(messages) -> None:
    """The renderer's input: a non-empty list of objects with a string 'role' and a string 'content'."""
    if not isinstance(messages, list) or not messages:
        raise BadRecordError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecordError(f"message {index} must be an object with 'role' and 'content', "
                                 f"got {type(message).__name__}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                got = "nothing" if value is None else type(value).__name__
                raise BadRecordError(f"message {index}: '{key}' must be a string, got {got}")


def render_text(tokenizer, messages: list[dict], tools=None, add_generation_prompt: bool = False) -> str:
    """The conversation as text, rendered by the tokenizer's current chat template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    if "tool_calls" not in template and any(message.get("tool_calls") for message in messages):
        # Such a template drops the calls: the model would be trained to answer them with nothing.
        raise BadRecordError("an assistant message has 'tool_calls' but the chat template ignores them; "
                             "use a template that renders tool calls (--template auto with a tool-aware model, "
                             "or a .jinja file)")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # jinja2 errors, raise_exception() in templates, missing keys
        raise BadRecordError(f"the chat template refused this conversation: {error}") from error


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of any text on its own (usually [bos] or [])."""
    with_special = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return list(with_special[:start])
    return []


def encode_text(tokenizer, text: str, leading_ids: list[int] | None = None) -> list[int]:
    """Tokenize rendered text, adding BOS only when the tokenizer would and the text lacks it."""
    leading = leading_special_ids(tokenizer) if leading_ids is None else leading_ids
    if not is_text(text):  # a lone surrogate: the tokenizer would raise from its Rust side
        raise BadRecordError("the conversation holds a lone UTF-16 surrogate (not valid Unicode text)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if leading and ids[:len(leading)] != leading:
        ids = leading + ids
    return ids


def render_prompt(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """Token ids of a conversation plus the generation prompt (assistant header), as training renders it."""
    check_messages(messages)
    return encode_text(tokenizer, render_text(tokenizer, messages, tools, add_generation_prompt=True))


def trim_after_last_assistant(messages: list[dict]) -> list[dict]:
    """Drop messages after the last assistant reply: nothing after it is trained or conditions it.
    The first step of tokenize_conversation and fit_conversation, so it checks the messages too."""
    check_messages(messages)
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecordError("the conversation has no assistant message to learn from")
    return messages[: last + 1]


def tokenize_conversation(tokenizer, messages: list[dict], tools=None, end_of_turn_ids=None) -> RenderedConversation:
    """Render and tokenize a conversation, locating every assistant turn by the token-prefix property."""
    messages = trim_after_last_assistant(messages)
    end_of_turn = set(end_of_turn_token_ids(tokenizer) if end_of_turn_ids is None else end_of_turn_ids)
    leading = leading_special_ids(tokenizer)
    whole_text = render_text(tokenizer, messages, tools)
    input_ids = encode_text(tokenizer, whole_text, leading)
    turns, previous_end = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render_text(tokenizer, messages[:index], tools, True)
        through_text = render_text(tokenizer, messages[: index + 1], tools)
        prompt = encode_text(tokenizer, prompt_text, leading)
        through = encode_text(tokenizer, through_text, leading)
        if not (whole_text.startswith(through_text) and through_text.startswith(prompt_text)):
            raise BadRecordError(
                f"message {index} (assistant): the chat template renders earlier turns differently once later "
                "ones follow (the text up to this reply is not a prefix of the whole conversation), so the "
                "reply's label span cannot be located; pick another --template"
            )
        _check_token_prefix(prompt, through, input_ids, index, previous_end)
        response_end = _end_of_response(through, len(prompt), end_of_turn)
        turns.append(AssistantTurn(previous_end, len(prompt), response_end, len(through)))
        previous_end = len(through)
    return RenderedConversation(input_ids, turns)


def _check_token_prefix(prompt, through, whole, index, previous_end) -> None:
    if whole[: len(prompt)] != prompt or whole[: len(through)] != through or len(prompt) < previous_end:
        raise BadRecordError(
            f"message {index} (assistant): the prompt before this reply is not a token prefix of the whole "
            "conversation: text at the boundary merges into one token (typically a reply that starts with "
            "two or more whitespace characters, merged with the template's header); strip that whitespace"
        )
    if len(through) <= len(prompt):
        raise BadRecordError(f"message {index} (assistant): the reply renders to no tokens")


def _end_of_response(through: list[int], response_start: int, end_of_turn: set[int]) -> int:
    """Just past the last end-of-turn token of the reply's span (the span's end when it has none)."""
    for position in range(len(through) - 1, response_start - 1, -1):
        if through[position] in end_of_turn:
            return position + 1
    return len(through)


def labels_for(rendered: RenderedConversation, train_on: str = "all_assistant") -> list[int]:
    """Labels aligned with input_ids: the token id where trained, IGNORE_INDEX elsewhere."""
    ids = rendered.input_ids
    if train_on == "all":
        return list(ids)
    if train_on not in TRAIN_ON_CHOICES:
        raise ValueError(f"train_on={train_on!r}: expected one of {', '.join(TRAIN_ON_CHOICES)}")
    labels = [IGNORE_INDEX] * len(ids)
    turns = rendered.turns[-1:] if train_on == "last_assistant" else rendered.turns
    for turn in turns:
        labels[turn.response_start:turn.response_end] = ids[turn.response_start:turn.response_end]
    return labels


def render_example(tokenizer, messages: list[dict], train_on: str = "all_assistant", tools=None,
                   end_of_turn_ids=None) -> dict:
    """One conversation -> {"input_ids", "labels"} (no truncation; see `truncate.fit_conversation`)."""
    rendered = tokenize_conversation(tokenizer, messages, tools, end_of_turn_ids)
    return {"input_ids": rendered.input_ids, "labels": labels_for(rendered, train_on)}
