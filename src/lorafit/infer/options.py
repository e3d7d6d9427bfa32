"""The generation flags every generating command shares (`chat`, `generate`, `serve` defaults).

One dataclass, one validation, one way to turn it into argparse flags, so the three commands cannot
drift apart. `--temperature 0` means greedy decoding (top-k and top-p are then irrelevant).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

from lorafit.errors import UserError


class GenerationOptionsError(UserError, ValueError):
    """A generation option is out of range; the message names the option and the allowed range."""

    def __init__(self, name: str, message: str):
        super().__init__(f"--{name} {message}")
        self.option = name


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = field(default=512, metadata={"help": "the most tokens to generate per answer"})
    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature; 0 means greedy (always the most likely token)"}
    )
    top_p: float = field(
        default=0.9, metadata={"help": "nucleus sampling: keep the smallest set of tokens whose probability reaches p (1 = off)"}
    )
    top_k: int = field(default=50, metadata={"help": "sample only among the k most likely tokens (0 = off)"})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "divide the logits of tokens already in the text by this (CTRL style; 1 = off)"}
    )
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling (unset: a fresh seed each run)"})
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "stop when the answer contains this string (repeatable); it is not included"}
    )

    @property
    def greedy(self) -> bool:
        # Below 1e-5, logits / temperature overflows float32 for no gain: it is greedy in all but name.
        return self.temperature < 1e-5 or self.top_k == 1

    def validate(self) -> "GenerationOptions":
        """Check every range once, at the boundary; errors name the flag."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationOptionsError("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise GenerationOptionsError("temperature", f"must be between 0 (greedy) and 100, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationOptionsError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationOptionsError("top_k", f"must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 100:
            raise GenerationOptionsError(
                "repetition_penalty", f"must be between 0.01 and 100 (1 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):  # what torch.manual_seed takes
            raise GenerationOptionsError("seed", f"must be an integer between -2**63 and 2**64 - 1, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationOptionsError("stop", f"strings must be non-empty, got {list(self.stop)!r}")
        return self

    def updated(self, **changes) -> "GenerationOptions":
        """A copy with the given fields replaced (None values keep the current setting), validated."""
        changes = {name: value for name, value in changes.items() if value is not None}
        if "stop" in changes:
            changes["stop"] = tuple(changes["stop"])
        return replace(self, **changes).validate()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def add_generation_arguments(parser: argparse.ArgumentParser, defaults: GenerationOptions | None = None) -> None:
    """Add `--max_new_tokens --temperature --top_p --top_k --repetition_penalty --seed --stop` to `parser`."""
    defaults = defaults or GenerationOptions()
    group = parser.add_argument_group("generation")
    types = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
             "repetition_penalty": float, "seed": int}
    for option in fields(GenerationOptions):
        default = getattr(defaults, option.name)
        help_ = option.metadata["help"]
        if option.name == "stop":
            group.add_argument("--stop", action="append", default=None, metavar="TEXT", help=help_)
            continue
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(f"--{option.name}", type=types[option.name], default=default, help=help_ + shown)


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    """The validated `GenerationOptions` from parsed flags."""
    values = {option.name: getattr(args, option.name) for option in fields(GenerationOptions)}
    values["stop"] = tuple(values["stop"] or ())
    return GenerationOptions(**values).validate()
