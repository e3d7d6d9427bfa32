"""Data errors: all are the user's to fix, so the CLI shows them without a traceback (exit 2)."""

from __future__ import annotations

from lorafit.errors import UserError

# How many bad records an error message lists before it only gives a count.
MAX_LISTED = 50


class DataConfigError(UserError, ValueError):
    """A data argument is wrong (unknown template, missing file, conflicting flags)."""


class BadRecordError(ValueError):
    """One record cannot become a training example; `reason` says why (collected, never shown alone)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRecordsError(UserError):
    """`--on_bad_record error` found bad records: lists them as `path:line: reason` lines."""

    def __init__(self, problems: list[tuple[str, str]], total: int | None = None):
        self.problems = problems
        total = len(problems) if total is None else total
        lines = [f"{source}: {reason}" for source, reason in problems[:MAX_LISTED]]
        if total > len(lines):
            lines.append(f"... and {total - len(lines)} more")
        header = f"{total} bad record{'s' if total != 1 else ''} (fix them, or pass --on_bad_record skip):"
        super().__init__("\n".join([header, *lines]))
