"""Truncation keeps the newest turns and every kept reply's end-of-turn token, and counts what it cut."""

from __future__ import annotations

import pytest
from data_helpers import fresh, trained_text

from lorafit.data.render import labels_for, render_example, tokenize_conversation
from lorafit.data.templates import set_chat_template
from lorafit.data.truncate import Limits, fit_conversation

EOT = "<|im_end|>"
SYSTEM = {"role": "system", "content": "Be brief."}


def exchanges(count: int) -> list[dict]:
    messages = [SYSTEM]
    for turn in range(count):
        messages += [{"role": "user", "content": f"Question number {turn}: what comes after {turn}?"},
                     {"role": "assistant", "content": f"The answer is {turn + 1}."}]
    return messages


@pytest.fixture(params=["auto", "alpaca"])
def tokenizer(request, smol_tokenizer):
    return set_chat_template(fresh(smol_tokenizer), request.param)


def fit(tokenizer, messages, **limits):
    rendered, report = fit_conversation(tokenizer, messages, Limits(**limits))
    return rendered, {"input_ids": rendered.input_ids, "labels": labels_for(rendered)}, report


def test_no_limit_hit_changes_nothing(tokenizer):
    messages = exchanges(3)
    rendered, example, report = fit(tokenizer, messages, cutoff_len=2048)
    assert example == render_example(tokenizer, messages) and not report.truncated


def test_oldest_turns_go_first_and_kept_replies_keep_their_end_of_turn(tokenizer):
    messages = exchanges(4)
    newest_two = [SYSTEM] + messages[-4:]
    budget = len(tokenize_conversation(tokenizer, newest_two).input_ids)
    rendered, example, report = fit(tokenizer, messages, cutoff_len=budget)
    assert example == render_example(tokenizer, newest_two)  # system prompt kept, re-rendered cleanly
    assert trained_text(tokenizer, example) == f"The answer is 3.{EOT}The answer is 4.{EOT}"
    assert (report.truncated, report.history_turns_dropped, report.responses_cut) == (True, 2, 0)


def test_then_the_prompt_is_cut_from_the_left(tokenizer):
    messages = exchanges(2)
    last = render_example(tokenizer, [SYSTEM] + messages[-2:])
    rendered, example, report = fit(tokenizer, messages, cutoff_len=len(last["input_ids"]) - 5)
    glue = _glue(tokenizer)  # template glue after the last end of turn goes first, then prompt tokens
    assert example["input_ids"] == last["input_ids"][5 - glue:len(last["input_ids"]) - glue]
    assert trained_text(tokenizer, example) == f"The answer is 2.{EOT}"
    assert report.history_turns_dropped == 1 and report.responses_cut == 0


def _glue(tokenizer) -> int:
    """Tokens the template writes after the end-of-turn token (ChatML's newline): dropped first."""
    return 1 if tokenizer.chat_template.startswith("{% for message") else 0


def test_reply_is_cut_last_and_the_cut_is_counted(tokenizer):
    messages = exchanges(1)
    reply_tokens = len(tokenizer("The answer is 1.", add_special_tokens=False)["input_ids"]) + 1
    rendered, example, report = fit(tokenizer, messages, cutoff_len=4)
    assert len(example["input_ids"]) == 4 and report.responses_cut == 1 and reply_tokens > 3
    assert example["labels"][0] == -100 and example["labels"][1:] == example["input_ids"][1:]
    assert EOT not in trained_text(tokenizer, example)  # a cut reply does not teach stopping mid-sentence


def test_recipe_limits_apply_per_turn(tokenizer):
    messages = exchanges(2)
    full = render_example(tokenizer, messages)
    rendered, example, report = fit(tokenizer, messages, max_target_length=3)
    assert report.responses_cut == 2 and len(example["input_ids"]) == len(full["input_ids"]) - 2 * 4
    assert trained_text(tokenizer, example) == "The answer isThe answer is"  # 3 tokens each, no end of turn
    rendered, example, report = fit(tokenizer, messages, max_source_length=6)
    assert report.truncated and report.responses_cut == 0
    assert trained_text(tokenizer, example) == f"The answer is 1.{EOT}The answer is 2.{EOT}"
    for turn in rendered.turns:
        assert turn.response_start - turn.prompt_start <= 6


def test_cutoff_too_small_for_any_label(tokenizer):
    rendered, example, report = fit(tokenizer, exchanges(1), cutoff_len=1)
    assert len(example["input_ids"]) == 1 and all(label == -100 for label in example["labels"][1:])
