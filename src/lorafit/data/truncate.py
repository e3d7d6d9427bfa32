"""Fit a conversation into the length limits, losing the least useful tokens first.

Order of sacrifice, per the data issue:

1. per turn, the ``run_clm`` recipe's limits when set: a prompt side longer than
   ``max_source_length`` keeps its last tokens (those next to the reply), a reply longer than
   ``max_target_length`` keeps its first tokens;
2. whole conversation over ``cutoff_len``: drop the oldest exchanges (user ... assistant), keeping the
   system prompt, re-rendering each time so the template sees a real conversation;
3. one exchange left and still too long: drop what follows the last end-of-turn token (template glue,
   never trained), then cut the prompt from the left;
4. last resort: cut the reply itself.

A reply that is cut loses its end-of-turn token: teaching the model to stop mid-sentence would be
worse than not teaching it to stop on that example. It is never silent: each cut is counted in
`FitReport.responses_cut` and shown in the data summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.data.render import AssistantTurn, RenderedConversation, tokenize_conversation, trim_after_last_assistant


@dataclass(frozen=True)
class Limits:
    cutoff_len: int | None = None
    max_source_length: int | None = None
    max_target_length: int | None = None

    @classmethod
    def from_args(cls, data_args) -> "Limits":
        return cls(data_args.cutoff_len, data_args.max_source_length, data_args.max_target_length)


@dataclass
class FitReport:
    truncated: bool = False
    history_turns_dropped: int = 0
    responses_cut: int = 0


@dataclass
class _Segments:
    """A rendered conversation as editable pieces: per turn (prompt, response, glue), then a tail."""

    turns: list[tuple[list[int], list[int], list[int]]]
    tail: list[int]
    cut_replies: set[int] = field(default_factory=set)  # turns whose reply lost its end

    @classmethod
    def split(cls, rendered: RenderedConversation) -> "_Segments":
        ids = rendered.input_ids
        turns = [(ids[t.prompt_start:t.response_start], ids[t.response_start:t.response_end],
                  ids[t.response_end:t.turn_end]) for t in rendered.turns]
        return cls(turns, ids[rendered.turns[-1].turn_end:] if rendered.turns else list(ids))

    def join(self) -> RenderedConversation:
        ids, turns = [], []
        for prompt, response, glue in self.turns:
            start = len(ids)
            ids += prompt
            response_start = len(ids)
            ids += response
            response_end = len(ids)
            ids += glue
            turns.append(AssistantTurn(start, response_start, response_end, len(ids)))
        return RenderedConversation(ids + self.tail, turns)

    def __len__(self) -> int:
        return sum(len(p) + len(r) + len(g) for p, r, g in self.turns) + len(self.tail)


def count_assistant(messages: list[dict]) -> int:
    return sum(message["role"] == "assistant" for message in messages)


def drop_oldest_exchange(messages: list[dict]) -> list[dict]:
    """Remove the messages after the leading system prompt up to and including the first reply."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    first_reply = next(i for i in range(start, len(messages)) if messages[i]["role"] == "assistant")
    return messages[:start] + messages[first_reply + 1:]


def apply_turn_limits(segments: _Segments, limits: Limits, report: FitReport) -> None:
    for index, (prompt, response, glue) in enumerate(segments.turns):
        if limits.max_source_length and len(prompt) > limits.max_source_length:
            prompt = prompt[-limits.max_source_length:]
            report.truncated = True
        if limits.max_target_length and len(response) > limits.max_target_length:
            response = response[:limits.max_target_length]
            report.truncated = True
            segments.cut_replies.add(index)
        segments.turns[index] = (prompt, response, glue)


def cut_to_length(segments: _Segments, cutoff_len: int, report: FitReport) -> None:
    """Steps 3 and 4 on the last turn (earlier turns were already dropped, or there were none)."""
    if len(segments) <= cutoff_len:
        return
    report.truncated = True
    prompt, response, _glue = segments.turns[-1]
    segments.tail = []
    segments.turns[-1] = (prompt, response, [])
    earlier = len(segments) - len(prompt) - len(response)  # turns kept before the last one
    budget = cutoff_len - earlier - len(response)
    if budget >= 1:
        prompt = prompt[len(prompt) - budget:] if budget < len(prompt) else prompt
    else:  # keep one token before the reply so its first token still has something to be predicted from
        prompt = prompt[-1:] if earlier == 0 else []
        response = response[: max(cutoff_len - earlier - len(prompt), 0)]
        segments.cut_replies.add(len(segments.turns) - 1)
    segments.turns[-1] = (prompt, response, [])


def fit_conversation(tokenizer, messages: list[dict], limits: Limits, tools=None,
                     end_of_turn_ids=None) -> tuple[RenderedConversation, FitReport]:
    """Render a conversation and truncate it into `limits` (see the module docstring for the order)."""
    messages = trim_after_last_assistant(messages)
    report = FitReport()
    while True:
        rendered = tokenize_conversation(tokenizer, messages, tools, end_of_turn_ids)
        segments = _Segments.split(rendered)
        apply_turn_limits(segments, limits, report)
        too_long = limits.cutoff_len is not None and len(segments) > limits.cutoff_len
        if not too_long or count_assistant(messages) <= 1:
            break
        messages = drop_oldest_exchange(messages)
        report.history_turns_dropped += 1
        report.truncated = True
    if limits.cutoff_len is not None:
        cut_to_length(segments, limits.cutoff_len, report)
    report.responses_cut = len(segments.cut_replies)
    fitted = segments.join()
    fitted.response_cut = report.responses_cut > 0
    return fitted, report
