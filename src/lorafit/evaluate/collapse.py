"""Signs that a fine-tune collapsed, read from its answers alone.

A model that over-learned a small data set gives one sentence to many different questions, and
repeats its training answers where they do not belong ("What is the capital of France?" ->
"I am Lumen, the assistant trained by Ostara Labs."). Both are counted per group of prompts:

- `distinct`: how many different answers the group's prompts got (answers are compared after
  folding case and whitespace); `largest_same`: how many prompts share the most common answer.
  The flag `same_answer` is raised when one answer is given to at least `SAME_ANSWER_FLAG`
  different prompts and to more than a fifth of the group.
- `training_answers`: how many answers are, verbatim, one of the adapter's training answers given
  to a prompt that is not that answer's training prompt.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

SAME_ANSWER_FLAG = 3


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Collapse:
    prompts: int
    distinct: int
    largest_same: int
    training_answers: int | None  # None when the training data is unknown

    @property
    def same_answer(self) -> bool:
        return self.largest_same >= SAME_ANSWER_FLAG and self.largest_same * 5 > self.prompts

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "distinct": self.distinct, "largest_same": self.largest_same,
                "same_answer": self.same_answer, "training_answers": self.training_answers}


def measure_collapse(prompts: list[str], answers: list[str],
                     training_pairs: dict[str, set[str]] | None = None) -> Collapse:
    """`training_pairs` maps a normalized training answer to the normalized prompts it answers."""
    counts = Counter(normalize(answer) for answer in answers)
    largest = max(counts.values(), default=0)
    repeated = None
    if training_pairs is not None:
        repeated = 0
        for prompt, answer in zip(prompts, answers):
            trained_for = training_pairs.get(normalize(answer))
            if trained_for is not None and normalize(prompt) not in trained_for:
                repeated += 1
    return Collapse(len(answers), len(counts), largest, repeated)


def training_pairs_from_conversations(conversations) -> dict[str, set[str]]:
    """Normalized assistant answer -> the normalized user turns it follows, from rendered-ready
    conversations (lists of {"role", "content"})."""
    pairs: dict[str, set[str]] = {}
    for messages in conversations:
        last_user = ""
        for message in messages:
            if message["role"] == "user":
                last_user = message["content"]
            elif message["role"] == "assistant" and message["content"].strip():
                pairs.setdefault(normalize(message["content"]), set()).add(normalize(last_user))
    return pairs
