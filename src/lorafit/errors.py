"""Errors that are the user's to fix: the CLI prints them as one message and exits 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data, adapters) with a message saying what to fix."""


class AdapterMismatchError(UserError, ValueError):
    """An adapter does not fit the base model it is loaded into (missing, unexpected or misshapen tensors)."""


class TargetModulesError(UserError, ValueError):
    """`target_modules` matched nothing in the model."""


class TrainingStopped(Exception):
    """Training ended before its last step, on purpose (a signal, repeated non-finite steps): the
    message says what happened and how to resume; the CLI prints it and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
