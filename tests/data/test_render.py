"""Rendering: labels are exactly the assistant replies plus their end-of-turn tokens, in every format
and template; BOS never doubled; history-rewriting templates rejected with a reason."""

from __future__ import annotations

import logging

import pytest
from data_helpers import A1, A2, CONVERSATION, RECORDS, fresh, trained_spans, trained_text, write_jsonl
from tokenizers.processors import TemplateProcessing

from lorafit.data.collate import PaddingCollator
from lorafit.data.errors import BadRecordError, DataConfigError
from lorafit.data.formats import Conversation, FormatOptions, read_records
from lorafit.data.render import encode_text, render_example, render_prompt, render_text
from lorafit.data.templates import end_of_turn_token_ids, set_chat_template

TEMPLATES = ["auto", "default", "alpaca", "chatml"]
EOT = "<|im_end|>"  # SmolLM2's end of turn, eos and pad at once


@pytest.fixture
def tokenizer(smol_tokenizer):
    return fresh(smol_tokenizer)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("data_format", list(RECORDS))
def test_labels_are_the_replies_and_their_end_of_turn(tokenizer, tmp_path, data_format, template):
    path = write_jsonl(tmp_path / "data.jsonl", [RECORDS[data_format]])
    (conversation,) = list(read_records(str(path), FormatOptions()))
    assert isinstance(conversation, Conversation) and conversation.source == f"{path}:1"
    assert conversation.messages == CONVERSATION
    set_chat_template(tokenizer, template)
    example = render_example(tokenizer, conversation.messages)
    assert trained_text(tokenizer, example) == A1 + EOT + A2 + EOT
    assert [tokenizer.decode(example["input_ids"][a:b]) for a, b in trained_spans(example)] == [A1 + EOT, A2 + EOT]
    assert all(label in (-100, token) for label, token in zip(example["labels"], example["input_ids"]))
    assert tokenizer.decode(example["input_ids"]) == render_text(tokenizer, CONVERSATION)


@pytest.mark.parametrize("template", TEMPLATES)
def test_train_on_choices(tokenizer, template):
    set_chat_template(tokenizer, template)
    last = render_example(tokenizer, CONVERSATION, train_on="last_assistant")
    assert trained_text(tokenizer, last) == A2 + EOT
    everything = render_example(tokenizer, CONVERSATION, train_on="all")
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_render_prompt_is_what_training_saw_before_the_reply(tokenizer, template):
    set_chat_template(tokenizer, template)
    example = render_example(tokenizer, CONVERSATION)
    prompt = render_prompt(tokenizer, CONVERSATION[:-1])
    last_reply_start = trained_spans(example)[-1][0]
    assert prompt == example["input_ids"][:last_reply_start]


def test_end_of_turn_tokens(tokenizer, tmp_path):
    im_end = tokenizer.convert_tokens_to_ids(EOT)
    for template in TEMPLATES:
        assert end_of_turn_token_ids(set_chat_template(tokenizer, template)) == [im_end]
    # a template closing turns with its own special token: that token, then eos
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), im_end]
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    set_chat_template(tokenizer, str(jinja))
    assert tokenizer.chat_template == jinja.read_text() and end_of_turn_token_ids(tokenizer) == [im_end]


def test_pad_equal_to_eos_keeps_the_end_of_turn_labelled(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOT)
    long = render_example(tokenizer, CONVERSATION)
    short = render_example(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    batch = PaddingCollator(tokenizer.pad_token_id)([long, short])
    row, length = batch["labels"][1].tolist(), len(short["input_ids"])
    assert row[:length] == short["labels"] and tokenizer.eos_token_id in row[:length]
    assert set(row[length:]) == {-100} and batch["attention_mask"][1, length:].sum() == 0
    assert set(batch["input_ids"][1, length:].tolist()) == {tokenizer.pad_token_id}


def bos_adding(tokenizer):
    """The tokenizer made to add a BOS itself, like Llama's: the setting where BOS gets doubled."""
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    return tokenizer


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_bos_is_never_doubled(tokenizer, template_writes_bos):
    tokenizer = bos_adding(set_chat_template(tokenizer, "chatml"))
    if template_writes_bos:
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    example = render_example(tokenizer, CONVERSATION)
    assert example["input_ids"][0] == 0 and example["input_ids"].count(0) == 1
    assert render_prompt(tokenizer, CONVERSATION[:-1])[:2] == example["input_ids"][:2]
    assert trained_text(tokenizer, example) == A1 + EOT + A2 + EOT
    assert encode_text(tokenizer, "<|endoftext|>x") == encode_text(tokenizer, "x")


def test_history_rewriting_template_is_rejected_with_a_reason(tokenizer):
    # like reasoning templates that drop earlier replies' text: the prefix is no longer a token prefix
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(BadRecordError, match="renders earlier turns differently.*pick another --template"):
        render_example(tokenizer, CONVERSATION)


@pytest.mark.parametrize("template", TEMPLATES)
def test_reply_merging_with_the_header_is_rejected_with_a_reason(tokenizer, template):
    set_chat_template(tokenizer, template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello"}]
    with pytest.raises(BadRecordError, match="not a token prefix.*strip that whitespace"):
        render_example(tokenizer, messages)
    messages[1]["content"] = " Hello"  # one leading space stays its own token boundary: fine
    assert trained_text(tokenizer, render_example(tokenizer, messages)) == " Hello" + EOT


def test_template_refusal_and_missing_reply_are_bad_records(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(BadRecordError, match="roles must alternate"):
        render_example(tokenizer, CONVERSATION)
    with pytest.raises(BadRecordError, match="no assistant message"):
        render_example(tokenizer, CONVERSATION[:2])


def test_trailing_user_turn_is_not_rendered(tokenizer):
    example = render_example(tokenizer, CONVERSATION + [{"role": "user", "content": "Thanks!"}])
    assert example == render_example(tokenizer, CONVERSATION)


def test_template_choices(tokenizer, caplog):
    with pytest.raises(DataConfigError, match="auto, default, alpaca, chatml"):
        set_chat_template(tokenizer, "vicuna")
    assert set_chat_template(tokenizer, "standard_alpaca").chat_template == set_chat_template(
        fresh(tokenizer), "alpaca").chat_template
    tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING):
        set_chat_template(tokenizer, "auto")
    assert "no chat template" in caplog.text
    assert tokenizer.chat_template == set_chat_template(fresh(tokenizer), "default").chat_template


def test_tools_reach_the_template(tokenizer):
    set_chat_template(tokenizer, "chatml")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    text = render_text(tokenizer, CONVERSATION, tools=tools)
    assert '"name": "add"' in text and text.count("<|im_start|>system") == 1
    example = render_example(tokenizer, CONVERSATION, tools=tools)
    assert trained_text(tokenizer, example) == A1 + EOT + A2 + EOT


def test_saved_tokenizer_carries_the_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    set_chat_template(tokenizer, "alpaca").save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert render_prompt(reloaded, CONVERSATION[:-1]) == render_prompt(tokenizer, CONVERSATION[:-1])


def test_tool_calls_under_a_template_that_drops_them_are_a_bad_record(smol_tokenizer):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]
    chatml = set_chat_template(fresh(smol_tokenizer), "chatml")
    with pytest.raises(BadRecordError, match="'tool_calls' but the chat template ignores them"):
        render_example(chatml, messages)
    aware = fresh(chatml)
    aware.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}")
    rendered = render_text(aware, messages)
    assert '"name": "add"' in rendered
