"""Mixing several training files: a small task set beside general data, at a chosen count or ratio.

The names are LLaMA-Factory's (`max_samples`, `mix_strategy`, `interleave_probs`), which users of
either tool would guess:

- `--max_samples N`: at most the first N records of *each* training file (before mixing);
- `--mix_strategy concat` (default): every file's records, one file after the other (the trainer
  shuffles them anyway);
- `--mix_strategy interleave_under`: draw the next record from file i with probability
  `interleave_probs[i]` (equal shares by default) until one file runs out, so the mix has the
  requested ratio and no record is repeated;
- `--mix_strategy interleave_over`: the same draws until every file has been used up at least
  once, starting a used-up file again from its beginning: small files are oversampled to the ratio.

A pure function of lists and a seed, so the counts are easy to test and the same on every run.
"""

from __future__ import annotations

import random

from lorafit.data.errors import DataConfigError

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


def parse_probs(value, files: int) -> list[float] | None:
    """`interleave_probs` from '0.7,0.3', [0.7, 0.3] or None, checked against the number of files."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        probs = [float(item) for item in items]
    except (TypeError, ValueError):
        raise DataConfigError(f"--interleave_probs {value!r}: expected numbers such as 0.8,0.2") from None
    if len(probs) != files:
        raise DataConfigError(f"--interleave_probs has {len(probs)} value(s) for {files} training file(s)")
    if any(p < 0 or p != p for p in probs) or sum(probs) <= 0:
        raise DataConfigError(f"--interleave_probs {value!r}: expected non-negative numbers with a positive sum")
    total = sum(probs)
    return [p / total for p in probs]


def mix(per_file: list[list], strategy: str = "concat", probs: list[float] | None = None,
        max_samples: int | None = None, seed: int = 42) -> list:
    """One list from the records of each file, as the module docstring describes."""
    if strategy not in MIX_STRATEGIES:
        raise DataConfigError(f"--mix_strategy {strategy!r}: expected one of {', '.join(MIX_STRATEGIES)}")
    lists = [records[:max_samples] if max_samples is not None else list(records) for records in per_file]
    if strategy == "concat" or len(lists) < 2:
        return [record for records in lists for record in records]
    weights = probs or [1.0 / len(lists)] * len(lists)
    live = [i for i, records in enumerate(lists) if records and weights[i] > 0]
    if not live:
        return []
    rng = random.Random(seed)
    positions = [0] * len(lists)
    used_up = [not lists[i] or weights[i] == 0 for i in range(len(lists))]
    mixed = []
    while True:
        i = rng.choices(live, weights=[weights[j] for j in live])[0]
        if positions[i] == len(lists[i]):
            if strategy == "interleave_under":
                return mixed
            positions[i] = 0  # oversample: start the file again
        mixed.append(lists[i][positions[i]])
        positions[i] += 1
        if positions[i] == len(lists[i]):
            used_up[i] = True
            if strategy == "interleave_under" or all(used_up):
                return mixed
