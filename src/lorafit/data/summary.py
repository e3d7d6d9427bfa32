"""What the data pipeline did, in numbers: shown before training and at the end of `data inspect`."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DataSummary:
    records_read: int = 0  # records found in the files (good and bad; blank lines are not records)
    rejected: int = 0  # bad records (listed, or written to rejected.jsonl)
    truncated: int = 0  # examples shortened by any limit
    history_turns_dropped: int = 0  # oldest exchanges removed to fit cutoff_len
    responses_cut: int = 0  # replies cut by a limit (they lose their end-of-turn token)
    dropped: int = 0  # examples left with no trainable token
    train_examples: int | None = 0  # None while streaming: not counted ahead
    eval_examples: int | None = 0
    tokens: int | None = 0  # training tokens (None while streaming: not counted ahead)
    trained_tokens: int | None = 0  # tokens with a label
    longest: int | None = 0
    template: str = "auto"
    train_on: str = "all_assistant"
    streaming: bool = False
    rejected_path: str | None = None
    cache_path: str | None = None
    placeholder_answers: int = 0  # records with {{name}} / {{author}} still in an answer (`data/placeholders.py`)
    placeholder_source: str | None = None  # the first of them, path:line

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"records read        {self.records_read}",
            f"rejected            {self.rejected}" + (f"  (see {self.rejected_path})" if self.rejected_path else ""),
            f"truncated           {self.truncated}" + (
                f"  ({self.history_turns_dropped} oldest turns dropped)" if self.history_turns_dropped else ""),
            f"responses cut       {self.responses_cut}" + (
                "  (these replies lost their end-of-turn token: raise --cutoff_len / --max_target_length?)"
                if self.responses_cut else ""),
            f"dropped (no label)  {self.dropped}",
        ]
        if self.streaming:
            lines.append("examples            not counted ahead (--streaming: read lazily during training)")
        else:
            lines += [f"train examples      {self.train_examples}", f"eval examples       {self.eval_examples}"]
        if self.tokens is None:
            lines.append("tokens              not counted ahead (--streaming)")
        else:
            share = f" ({100 * self.trained_tokens / self.tokens:.1f}%)" if self.tokens else ""
            lines += [f"tokens              {self.tokens}  (longest example {self.longest})",
                      f"trained tokens      {self.trained_tokens}{share}"]
        lines.append(f"template            {self.template}, train_on={self.train_on}")
        if self.placeholder_answers:
            lines.append(f"placeholders        {self.placeholder_answers} records hold {{{{name}}}} or "
                         f"{{{{author}}}} in an answer (first: {self.placeholder_source}): fill them in")
        return "data summary\n" + "\n".join("  " + line for line in lines)


def padding_efficiency(lengths: list[int], batch_size: int, packing: bool = False,
                       pad_to_multiple_of: int | None = None) -> float:
    """Share of real tokens in the batches built from `lengths` in this order (1.0 = no padding)."""
    if not lengths:
        return 1.0
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        width = sum(batch) if packing else max(batch)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(batch)
        padded += width if packing else width * len(batch)
    return real / padded
