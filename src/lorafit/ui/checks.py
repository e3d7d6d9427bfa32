"""Checking the form before anything starts, with `lorafit train`'s own checks and messages.

Each check is the one the CLI runs, called the same way: the argument parser
(`parse_train_args`), the output folder check (`train.run.check_output_dir`), model resolution,
and the data pipeline (in `preview`). A failure becomes a `FormError` that puts the CLI's message
next to the field it concerns: the field the message names (`--lora_rank ...`), else the field the
check was about.
"""

from __future__ import annotations

import functools
import re

from lorafit.errors import UserError
from lorafit.train.args import TrainConfig, build_parser, parse_train_args, valid_names
from lorafit.ui.form import EXTRA_ARGS, FIELDS_BY_NAME, FormError, form_argv

GENERAL = "form"  # errors that belong to no one field
_FLAG = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*)")
_UNKNOWN = re.compile(r"unknown argument '([^']+)'")


@functools.lru_cache(maxsize=1)
def train_names() -> frozenset[str]:
    return frozenset(valid_names(build_parser()))


def field_for(message: str, fallback: str = GENERAL) -> str:
    """The form field a CLI message is about: the first flag it names that the form shows; a flag
    only the other-arguments box can set, or an unknown one, points at that box."""
    if _UNKNOWN.search(message):
        return EXTRA_ARGS
    for name in _FLAG.findall(message):
        if name in FIELDS_BY_NAME:
            return name
        if name in train_names() or name.removeprefix("no_") in train_names():
            return EXTRA_ARGS
    return fallback


def form_error(error: UserError, fallback: str = GENERAL) -> FormError:
    if isinstance(error, FormError):
        return error
    message = str(error)
    return FormError({field_for(message, fallback): message})


def parse_form(values: dict) -> tuple[list[str], TrainConfig]:
    """The form as `lorafit train` flags and their parse; a bad value is a FormError with the CLI's message."""
    argv = form_argv(values)
    try:
        return argv, parse_train_args(argv)
    except UserError as error:
        raise form_error(error) from None


def check_can_start(config: TrainConfig, resume: bool = False) -> None:
    """What `lorafit train` refuses before it loads anything: a folder holding another run, a
    model folder that is not there."""
    from lorafit.models import resolve_model_path
    from lorafit.train.run import check_output_dir, resolve_resume

    try:
        # is_main=False: only check; with --overwrite_output_dir the run itself clears old checkpoints.
        check_output_dir(config, resolve_resume(config) if resume else None, is_main=False)
    except UserError as error:
        raise form_error(error, "output_dir") from None
    try:
        resolve_model_path(config.model.model_name_or_path)
    except UserError as error:
        raise form_error(error, "model_name_or_path") from None

