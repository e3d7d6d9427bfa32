"""Errors that are the user's to fix: the CLI prints them as one message and exits 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data, adapters) with a message saying what to fix."""


class AdapterMismatchError(UserError, ValueError):
    """An adapter does not fit the base model it is loaded into (missing, unexpected or misshapen tensors)."""


class TargetModulesError(UserError, ValueError):
    """`target_modules` matched nothing in the model."""
