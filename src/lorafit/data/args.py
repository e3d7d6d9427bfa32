"""`DataArguments`: every data flag, as a dataclass `transformers.HfArgumentParser` turns into options.

Names follow the `run_clm` recipe where it has one (`--train_file`, `--prompt_column`,
`--max_source_length`, `--prompt_type`, `--ignore_pad_token_for_loss`...), so its command lines keep
working; defaults differ where the recipe's are a trap (see `max_target_length`).
`group_by_length` is a `TrainingArguments` flag and is not repeated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from lorafit.data.errors import DataConfigError

DATA_FORMATS = ("auto", "prompt_response", "alpaca", "sharegpt", "messages")


def _repeatable(help_: str) -> dict:
    # `--train_file a.jsonl --train_file b.jsonl` and `--train_file a.jsonl b.jsonl` both give both files.
    return {"help": help_, "action": "extend"}


@dataclass
class DataArguments:
    train_file: list[str] | None = field(
        default=None,
        metadata=_repeatable("training data: JSON / JSON Lines files, folders of them, or globs (repeatable)"),
    )
    validation_file: list[str] | None = field(
        default=None, metadata=_repeatable("evaluation data, same forms as --train_file (repeatable)")
    )
    validation_split_percentage: float = field(
        default=0.0,
        metadata={"help": "percent of the training records held out for evaluation when no --validation_file (0: none)"},
    )
    data_format: Literal["auto", "prompt_response", "alpaca", "sharegpt", "messages"] = field(
        default="auto",
        metadata={"help": "record format; auto detects it per file from the keys of its first records"},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "prompt_response format: the prompt field"})
    response_column: str = field(default="response", metadata={"help": "prompt_response format: the response field"})
    history_column: str = field(
        default="history", metadata={"help": "prompt_response/alpaca: earlier turns as [[prompt, response], ...]"}
    )
    system_column: str = field(default="system", metadata={"help": "optional field holding a system prompt"})
    template: str = field(
        default="auto",
        metadata={"help": "chat template: auto (the tokenizer's own), default, alpaca, chatml, or a .jinja file"},
    )
    prompt_type: Literal["default", "standard_alpaca"] | None = field(
        default=None, metadata={"help": "run_clm recipe spelling of --template default / alpaca"}
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = field(
        default="all_assistant",
        metadata={"help": "which tokens carry labels: every assistant reply, the last one, or the whole text"},
    )
    cutoff_len: int | None = field(
        default=2048,
        metadata={"help": "longest tokenized example; longer ones lose their oldest turns, then prompt text"},
    )
    max_source_length: int | None = field(
        default=None, metadata={"help": "run_clm recipe: most prompt-side tokens per turn, cut from the left (unset: no limit)"}
    )
    max_target_length: int | None = field(
        default=None,
        metadata={"help": "run_clm recipe: most response tokens per turn (unset: no limit; the recipe's 128 cuts most answers)"},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "pad each batch's length up to a multiple of this (e.g. 8 for tensor cores)"}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack each batch's examples into one row (position_ids restart, no cross-example attention)"},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes used to tokenize (datasets.map num_proc)"}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "re-tokenize even when a cached result exists"})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "where tokenized data is cached (default $LORAFIT_HOME/data-cache)"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "read and tokenize lazily, for JSON Lines files larger than memory"}
    )
    on_bad_record: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "error: list bad records and stop; skip: go on, writing them to <output_dir>/rejected.jsonl"},
    )
    ignore_pad_token_for_loss: bool = field(
        default=True,
        metadata={"help": "run_clm recipe flag, accepted for compatibility: padding is never in the loss either way"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "keep only the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep only the first N evaluation examples"})
    max_samples: int | None = field(
        default=None, metadata={"help": "at most the first N records of each --train_file, before mixing (LLaMA-Factory's name)"}
    )
    mix_strategy: str = field(
        default="concat",
        metadata={"help": "how several --train_file mix: concat, interleave_under (to --interleave_probs, until "
                          "one file runs out) or interleave_over (until every file is used, small ones repeated)"},
    )
    interleave_probs: str | None = field(
        default=None, metadata={"help": "for interleave_*: the share of each --train_file, e.g. 0.8,0.2 (default: equal)"}
    )

    def __post_init__(self):
        self.train_file = _flatten(self.train_file)
        self.validation_file = _flatten(self.validation_file)
        for name in ("cutoff_len", "max_source_length", "max_target_length", "pad_to_multiple_of",
                     "max_train_samples", "max_eval_samples", "max_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataConfigError(f"--{name} must be at least 1 (got {value})")
        if not 0 <= self.validation_split_percentage < 100:
            raise DataConfigError(
                f"--validation_split_percentage must be in [0, 100) (got {self.validation_split_percentage})"
            )
        from lorafit.data.mix import MIX_STRATEGIES

        if isinstance(self.interleave_probs, (list, tuple)):  # a YAML list
            self.interleave_probs = ",".join(str(p) for p in self.interleave_probs)
        choices = {"mix_strategy": MIX_STRATEGIES, "data_format": DATA_FORMATS,
                   "train_on": ("all_assistant", "last_assistant", "all"), "on_bad_record": ("error", "skip"), "prompt_type": (None, "default", "standard_alpaca")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(str(choice) for choice in allowed if choice is not None)
                raise DataConfigError(f"--{name} {getattr(self, name)!r}: expected one of {shown}")
        if self.streaming and (self.max_samples is not None or self.mix_strategy != "concat"):
            raise DataConfigError("--max_samples and --mix_strategy need the files in memory; drop --streaming")

    @property
    def template_choice(self) -> str:
        """The template in force: an explicit --template wins over the recipe's --prompt_type."""
        from lorafit.data.templates import template_name

        return template_name(self.template, self.prompt_type)

    def cache_root(self) -> str:
        if self.data_cache_dir:
            return os.path.expanduser(self.data_cache_dir)
        from lorafit.models import lorafit_home

        return str(lorafit_home() / "data-cache")


def _flatten(files):
    """Accept a single string or comma-separated lists from YAML/dict configs as well as lists."""
    if files is None:
        return None
    if isinstance(files, str):
        files = [files]
    return [part.strip() for item in files for part in str(item).split(",") if part.strip()] or None
