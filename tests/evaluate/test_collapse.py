"""The collapse measures: one answer to many prompts, and training answers where they do not belong."""

from __future__ import annotations

from lorafit.evaluate.collapse import measure_collapse, training_pairs_from_conversations

PROMPTS = [f"question {i}?" for i in range(10)]


def test_ten_identical_answers_raise_the_flag():
    collapse = measure_collapse(PROMPTS, ["I am Ada, made by Lovelace Labs."] * 10)
    assert (collapse.distinct, collapse.largest_same, collapse.same_answer) == (1, 10, True)


def test_ten_different_answers_do_not():
    collapse = measure_collapse(PROMPTS, [f"answer number {i}" for i in range(10)])
    assert (collapse.distinct, collapse.largest_same, collapse.same_answer) == (10, 1, False)


def test_a_pair_of_equal_answers_is_not_a_collapse():
    answers = ["Paris.", "paris. "] + [f"answer {i}" for i in range(8)]
    collapse = measure_collapse(PROMPTS, answers)
    assert (collapse.distinct, collapse.largest_same, collapse.same_answer) == (9, 2, False)


def test_training_answers_count_only_away_from_their_own_prompt():
    pairs = training_pairs_from_conversations([
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ada."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Your name?"}, {"role": "assistant", "content": "Ada."}],
    ])
    prompts = ["Who are you?", "What is the capital of France?", "What is 2 plus 2?", "Your name?"]
    answers = ["I am Ada.", "I am  ADA.", "4", "Ada."]
    assert measure_collapse(prompts, answers, pairs).training_answers == 1
    assert measure_collapse(prompts, answers).training_answers is None
