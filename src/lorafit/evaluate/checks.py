"""What a user expects of an answer, written beside the prompt, and the test of an answer against it.

A prompts file for `lorafit eval` holds one JSON object per line: the prompt (as `lorafit generate`
reads it: `"prompt"` with optional `"system"`/`"history"`, or `"messages"`), an optional `"group"`
(rows of the table: "identity", "general", ...), and checks:

    expect_any   a list of strings; the answer contains at least one   ("Paris")
    expect_all   a list of strings; the answer contains every one
    expect_none  a list of strings; the answer contains none           (the persona's name, in a general question)
    regex        a pattern (or list of patterns) the answer matches    ("\\b(no|not)\\b")

Strings match case-insensitively; patterns are Python regular expressions, searched case-insensitively.
Keys at the top level form the prompt's one check, "pass". Several named checks go under
`"checks": {"name": {"expect_any": [...]}, "maker": {...}}`, each counted on its own; the prompt
passes when all of them do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHECK_KEYS = ("expect_any", "expect_all", "expect_none", "regex")
DEFAULT_CHECK = "pass"


@dataclass(frozen=True)
class Check:
    """One named expectation about an answer."""

    name: str
    expect_any: tuple[str, ...] = ()
    expect_all: tuple[str, ...] = ()
    expect_none: tuple[str, ...] = ()
    regex: tuple[re.Pattern, ...] = field(default=())

    def passes(self, answer: str) -> bool:
        text = answer.casefold()
        if self.expect_any and not any(s.casefold() in text for s in self.expect_any):
            return False
        if any(s.casefold() not in text for s in self.expect_all):
            return False
        if any(s.casefold() in text for s in self.expect_none):
            return False
        return all(pattern.search(answer) for pattern in self.regex)


def _strings(value, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise ValueError(f'"{key}" must be a non-empty list of non-empty strings')
    return tuple(value)


def _patterns(value, key: str) -> tuple[re.Pattern, ...]:
    compiled = []
    for pattern in _strings(value, key):
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as error:
            raise ValueError(f'"{key}": {pattern!r} is not a valid regular expression ({error})') from None
    return tuple(compiled)


def check_from_fields(name: str, fields: dict, where: str = "") -> Check | None:
    """The check described by the CHECK_KEYS of `fields`, or None when it has none of them."""
    present = {key: fields[key] for key in CHECK_KEYS if key in fields}
    if not present:
        return None
    prefix = f"{where}: " if where else ""
    try:
        return Check(
            name=name,
            expect_any=_strings(present["expect_any"], "expect_any") if "expect_any" in present else (),
            expect_all=_strings(present["expect_all"], "expect_all") if "expect_all" in present else (),
            expect_none=_strings(present["expect_none"], "expect_none") if "expect_none" in present else (),
            regex=_patterns(present["regex"], "regex") if "regex" in present else (),
        )
    except ValueError as error:
        raise ValueError(prefix + str(error)) from None


def checks_from_record(record: dict) -> tuple[Check, ...]:
    """Every check a prompts-file record declares (top-level keys and the `"checks"` table)."""
    checks = []
    top = check_from_fields(DEFAULT_CHECK, record)
    if top is not None:
        checks.append(top)
    named = record.get("checks")
    if named is not None:
        if not isinstance(named, dict) or not named:
            raise ValueError('"checks" must be an object of named checks, e.g. {"name": {"expect_any": ["Ada"]}}')
        for name, fields in named.items():
            if not isinstance(fields, dict):
                raise ValueError(f'"checks"."{name}" must be an object with {", ".join(CHECK_KEYS)}')
            unknown = sorted(set(fields) - set(CHECK_KEYS))
            if unknown:
                raise ValueError(f'"checks"."{name}": unknown key(s) {", ".join(unknown)}; expected {", ".join(CHECK_KEYS)}')
            check = check_from_fields(name, fields, where=f'"checks"."{name}"')
            if check is None:
                raise ValueError(f'"checks"."{name}" has none of {", ".join(CHECK_KEYS)}')
            if name == DEFAULT_CHECK and top is not None:
                raise ValueError(f'"checks" names "{DEFAULT_CHECK}", which the top-level keys already define')
            checks.append(check)
    return tuple(checks)


def run_checks(checks: tuple[Check, ...], answer: str) -> dict[str, bool]:
    return {check.name: check.passes(answer) for check in checks}
