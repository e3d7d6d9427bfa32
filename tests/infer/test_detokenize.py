"""Streaming text from token ids: pieces add up to the full decode; stop strings never leak."""

from __future__ import annotations

import pytest

from lorafit.infer.detokenize import IncrementalDecoder

TEXTS = [
    "Hello world, this is a test.",
    "Emoji 🦙🚀 and accents: café, naïve — done.",
    "  leading spaces\n\nand   blank lines\t tabs",
    "日本語のテキストも大丈夫です。",
]


def stream(tokenizer, ids, stops=()):
    decoder = IncrementalDecoder(tokenizer, stops)
    pieces = [decoder.add(token) for token in ids]
    pieces.append(decoder.finish())
    return decoder, [p for p in pieces if p]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(smol_tokenizer, text):
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    decoder, pieces = stream(smol_tokenizer, ids)
    assert "".join(pieces) == smol_tokenizer.decode(ids) == decoder.answer
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    assert not decoder.stopped


def test_special_tokens_are_not_shown(smol_tokenizer):
    ids = smol_tokenizer.encode("Hi there", add_special_tokens=False) + [smol_tokenizer.eos_token_id]
    _, pieces = stream(smol_tokenizer, ids)
    assert "".join(pieces) == "Hi there"


@pytest.mark.parametrize("stops, expected", [
    (["###"], "The answer is 42."),
    (["answer is 4"], "The "),
    (["42", "The"], ""),
    (["nothing like this"], "The answer is 42.### User: more"),
])
def test_stop_strings_cut_the_answer_and_never_leak(smol_tokenizer, stops, expected):
    text = "The answer is 42.### User: more"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    decoder, pieces = stream(smol_tokenizer, ids, stops)
    assert "".join(pieces) == expected == decoder.answer
    assert decoder.stopped == (expected != text)


def test_a_partial_stop_string_at_the_end_is_released(smol_tokenizer):
    ids = smol_tokenizer.encode("Count: 1, 2, 3 ##", add_special_tokens=False)
    decoder, pieces = stream(smol_tokenizer, ids, ["###"])
    assert "".join(pieces) == "Count: 1, 2, 3 ##"
    # ... but only at the end: while it could still become "###" it was held back.
    assert not any(piece.endswith("#") for piece in pieces[:-1])
