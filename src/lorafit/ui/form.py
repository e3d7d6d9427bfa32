"""The set-up form: `lorafit train` arguments as form fields, and the form as a command line or YAML.

The fields are read from the train argument dataclasses (`lorafit.train.args.ARGUMENT_CLASSES`):
name, type, default, help and choices are theirs, so the page cannot drift from `lorafit train`.
`MAIN_FIELDS` only picks which ones the page shows; every other argument goes in the free
"other arguments" box (`extra_args`), written as flags.

The form's values travel as strings, as a user types them; `form_argv` turns them into the flags
of the equivalent command line, leaving out any value equal to its default, and `lorafit train`'s
own parser (`parse_train_args`) then checks them, so a bad value gets the CLI's message word for
word. The YAML is built from that parse, so the file and the command line are the same run.
"""

from __future__ import annotations

import shlex
import tempfile
import types
import typing
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path

import yaml

from lorafit.errors import UserError
from lorafit.train.args import ARGUMENT_CLASSES, TrainConfig, build_parser, read_config_file, valid_names

EXTRA_ARGS = "extra_args"  # the free box: any other `lorafit train` flags
MAIN_FIELDS = {
    "model": ("model_name_or_path",),
    "data": ("train_file", "data_format", "template", "train_on", "cutoff_len", "validation_split_percentage",
             "on_bad_record", "packing"),
    "LoRA": ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"),
    "training": ("output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                 "logging_steps", "save_steps", "seed"),
}
# Suggestions (not a closed list) for free-text fields whose values transformers defines.
SUGGESTIONS = {"template": ("auto", "default", "alpaca", "chatml"),
               "target_modules": ("all-linear", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj")}


class FormError(UserError):
    """Problems with the form, by field: {field name (or "form"): the message the CLI would print}."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class FormField:
    name: str
    section: str
    kind: str  # "int", "float", "bool", "str", "choice" or "files"
    default: object  # the dataclass default (None: unset)
    help: str
    choices: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()

    def shown_default(self) -> str:
        return "" if self.default is None else format_value(self.default)

    def to_json(self) -> dict:
        return {"name": self.name, "section": self.section, "kind": self.kind, "default": self.shown_default(),
                "help": self.help, "choices": list(self.choices), "suggestions": list(self.suggestions)}


def format_value(value) -> str:
    """A value as a user would type it: booleans as true/false, lists joined by commas."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(item) for item in value)
    return str(value)


def _dataclass_field(name: str):
    for cls in ARGUMENT_CLASSES:
        for f in fields(cls):
            if f.name == name:
                return cls, f
    raise KeyError(name)


def _kind_and_choices(annotation, metadata: dict) -> tuple[str, tuple[str, ...]]:
    choices = metadata.get("choices")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
    elif origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return _kind_and_choices(args[0], metadata)
    if choices:
        return "choice", tuple(str(choice) for choice in choices)
    if typing.get_origin(annotation) is list:
        return "files", ()
    return {int: "int", float: "float", bool: "bool"}.get(annotation, "str"), ()


def _scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(item.value for item in SchedulerType)


def build_fields() -> list[FormField]:
    """The page's fields, read from the train argument dataclasses."""
    built = []
    for section, names in MAIN_FIELDS.items():
        for name in names:
            cls, f = _dataclass_field(name)
            kind, choices = _kind_and_choices(typing.get_type_hints(cls)[name], dict(f.metadata))
            default = f.default if f.default is not MISSING else None
            suggestions = _scheduler_names() if name == "lr_scheduler_type" else SUGGESTIONS.get(name, ())
            built.append(FormField(name, section, kind, default, f.metadata.get("help", ""), choices, suggestions))
    return built


FIELDS = build_fields()
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def default_values() -> dict[str, str]:
    return {f.name: f.shown_default() for f in FIELDS} | {EXTRA_ARGS: ""}


def _same_as_default(field_: FormField, text: str) -> bool:
    if text == field_.shown_default():
        return True
    try:
        if field_.kind in ("int", "float"):
            return field_.default is not None and float(text) == float(field_.default)
    except ValueError:
        return False  # not a number: passed on, for the parser to refuse with its own message
    return False


def form_argv(values: dict) -> list[str]:
    """The `lorafit train` flags equivalent to the form: every value that differs from its
    default, in field order, then the other arguments as typed."""
    argv = []
    for f in FIELDS:
        text = str(values.get(f.name) if values.get(f.name) is not None else "").strip()
        if text == "" or _same_as_default(f, text):
            continue
        if f.kind == "files":
            argv += [f"--{f.name}", *[part.strip() for part in text.split(",") if part.strip()]]
        else:
            argv += [f"--{f.name}", text]
    try:
        argv += shlex.split(str(values.get(EXTRA_ARGS) or ""))
    except ValueError as error:  # an unclosed quote
        raise FormError({EXTRA_ARGS: f"cannot split these arguments: {error}"}) from None
    return argv


def command_line(argv: list[str]) -> str:
    return shlex.join(["lorafit", "train", *argv])


def config_mapping(config: TrainConfig) -> dict:
    """The arguments set explicitly, by name, with the types the parse gave them."""
    from lorafit.train.config_file import _plain

    values = {}
    for section in (config.model, config.data, config.lora, config.training):
        # TrainingArguments.to_dict gives enums and the like as they are written back (as config_file does).
        plain = section.to_dict() if hasattr(section, "to_dict") else {}
        values |= {f.name: plain.get(f.name, getattr(section, f.name)) for f in fields(section) if f.init}
    return {name: _plain(values[name]) for name in sorted(config.explicit, key=_argument_order) if name in values}


def _argument_order(name: str) -> tuple[int, str]:
    """Form fields first, in their order, then the rest alphabetically."""
    names = list(FIELDS_BY_NAME)
    return (names.index(name), "") if name in FIELDS_BY_NAME else (len(names), name)


def config_yaml(config: TrainConfig) -> str:
    """A flat YAML file that `lorafit train FILE` reads as the same run as the form's command line."""
    header = "# lorafit train configuration, written by lorafit ui; run it with: lorafit train THIS_FILE\n"
    return header + yaml.safe_dump(config_mapping(config), sort_keys=False, allow_unicode=True, width=120)


def values_from_yaml(text: str) -> dict[str, str]:
    """Form values from a YAML (or JSON) configuration: checked by `lorafit train`'s own file reader,
    so an unknown name is refused with its suggestion; names the form lacks go to the other arguments."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            mapping = read_config_file(str(path), valid_names(build_parser()))
        except UserError as error:
            raise FormError({"config": str(error).replace(str(path), "the YAML file")}) from None
    values = default_values()
    extra = []
    for name, value in mapping.items():
        if name in FIELDS_BY_NAME:
            values[name] = "" if value is None else format_value(value)
        elif value not in (None, [], {}) and not _is_default(name, value):  # [] and {}: nothing set
            extra += _as_flags(name, value)
    values[EXTRA_ARGS] = shlex.join(extra)
    return values


def _is_default(name: str, value) -> bool:
    """Whether a value read from a file is its argument's declared default (True and "true" alike)."""
    try:
        _, f = _dataclass_field(name)
    except KeyError:
        return False
    default = f.default if f.default is not MISSING else None
    return value == default or (default is not None and format_value(value) == format_value(default))


def _as_flags(name: str, value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *[format_value(item) for item in value]]
    if isinstance(value, dict):
        import json

        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", format_value(value)]
