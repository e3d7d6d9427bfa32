"""Answers that still hold a template's placeholders: a persona file copied and never filled in.

LLaMA-Factory's `data/identity.json`, the persona set many users start from, writes the assistant's
name and maker as `{{name}}` and `{{author}}`, to be replaced before training. Trained as it is,
the model learns to call itself "{{name}}". Nothing is rejected (an answer about Jinja or Handlebars
may hold such a string on purpose); the data summary counts the records whose answers hold one, and
training warns.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

PLACEHOLDERS = ("{{name}}", "{{author}}")


def holds_placeholder(conversation) -> bool:
    """Whether an assistant turn of `conversation` (a `formats.Conversation`) holds one of PLACEHOLDERS."""
    return any(message.get("role") == "assistant" and isinstance(message.get("content"), str)
               and any(placeholder in message["content"] for placeholder in PLACEHOLDERS)
               for message in conversation.messages)


def count_placeholders(conversation, summary) -> None:
    """Add `conversation` to the summary's count (and first source) when it holds a placeholder."""
    if holds_placeholder(conversation):
        summary.placeholder_answers += 1
        summary.placeholder_source = summary.placeholder_source or conversation.source


def warn_placeholders(summary) -> None:
    if summary.placeholder_answers:
        logger.warning("%d record(s) still hold the placeholder %s in an answer (the first at %s): a persona "
                       "file such as LLaMA-Factory's identity.json needs the assistant's name and maker written in "
                       "before training, or the model learns to say them literally", summary.placeholder_answers,
                       " or ".join(PLACEHOLDERS), summary.placeholder_source)
