"""Property tests on random conversations: labels are -100 or the input token, and every trained span
is exactly one assistant reply plus its end-of-turn token; truncation never breaks either."""

from __future__ import annotations

import pytest
from data_helpers import fresh
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorafit.data.errors import BadRecordError
from lorafit.data.render import labels_for, render_example, tokenize_conversation
from lorafit.data.templates import set_chat_template
from lorafit.data.truncate import Limits, fit_conversation

EOT = "<|im_end|>"
# Letters, digits, punctuation, spaces, newlines and a few multi-byte characters; no special-token text.
TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ019 .,?!'\"-:\n\té😀中")), min_size=0, max_size=30)
# A reply has at least one visible character (empty ones are bad records), maybe leading whitespace.
REPLY = st.builds(lambda lead, visible, rest: lead + visible + rest,
                  st.sampled_from(["", "", "", "", "", " ", "\n", "\t", "\n\n"]),
                  st.sampled_from(list("aZ9.?é😀中")), TEXT)
TEMPLATES = ["auto", "default", "alpaca", "chatml"]


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(REPLY)})
    return messages


@pytest.fixture(scope="module")
def tokenizers(smol_tokenizer):
    return {name: set_chat_template(fresh(smol_tokenizer), name) for name in TEMPLATES}


def check(tokenizer, rendered, labels, replies) -> list[str]:
    """Labels are -100 or the token; trained positions lie inside reply spans; returns the span texts."""
    ids = rendered.input_ids
    assert len(ids) == len(labels)
    assert all(label == -100 or label == token for label, token in zip(labels, ids))
    inside = {p for turn in rendered.turns for p in range(turn.response_start, turn.response_end)}
    assert all(label == -100 or position in inside for position, label in enumerate(labels))
    texts = [tokenizer.decode(ids[t.response_start:t.response_end]) for t in rendered.turns]
    for text in texts:  # each span is a whole reply plus end of turn, or (cut) the start of a reply
        body = text[: -len(EOT)] if text.endswith(EOT) else text.rstrip("\ufffd")  # a cut may split a character
        assert any(reply.startswith(body) for reply in replies), (text, replies)
    return texts


def render_or_boundary_merge(tokenizer, messages, **kwargs):
    try:
        return render_example(tokenizer, messages, **kwargs)
    except BadRecordError as error:
        # the only legitimate refusal: a reply starting with whitespace that merges with the header
        assert "not a token prefix" in str(error)
        assert any(m["content"][:2].isspace() for m in messages if m["role"] == "assistant")
        assume(False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), template=st.sampled_from(TEMPLATES))
def test_labels_are_exactly_the_replies(tokenizers, messages, template):
    tokenizer = tokenizers[template]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if render_or_boundary_merge(tokenizer, messages) is None:
        return
    rendered = tokenize_conversation(tokenizer, messages)
    assert check(tokenizer, rendered, labels_for(rendered), replies) == [reply + EOT for reply in replies]
    last = labels_for(rendered, "last_assistant")
    assert [t for t, label in zip(rendered.input_ids, last) if label != -100] == \
        rendered.input_ids[rendered.turns[-1].response_start:rendered.turns[-1].response_end]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), template=st.sampled_from(TEMPLATES), cutoff=st.integers(2, 80),
       target=st.one_of(st.none(), st.integers(1, 8)))
def test_truncation_keeps_labels_inside_replies(tokenizers, messages, template, cutoff, target):
    tokenizer = tokenizers[template]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if render_or_boundary_merge(tokenizer, messages) is None:
        return
    rendered, report = fit_conversation(tokenizer, messages, Limits(cutoff, None, target))
    assert len(rendered.input_ids) <= cutoff
    texts = check(tokenizer, rendered, labels_for(rendered), replies)
    # the kept replies are the newest ones, in order; a reply that lost its end of turn was counted as cut
    kept = replies[len(replies) - len(texts):]
    assert all(text == reply + EOT or not text.endswith(EOT) for text, reply in zip(texts, kept))
    assert sum(not text.endswith(EOT) for text in texts) == report.responses_cut
    assert report.history_turns_dropped == len(replies) - len(texts)
