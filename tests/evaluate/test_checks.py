"""The checks a prompts file declares, on fixed answers; and how bad check fields are reported."""

from __future__ import annotations

import pytest

from lorafit.evaluate.checks import checks_from_record, run_checks


def results(record: dict, answer: str) -> dict[str, bool]:
    return run_checks(checks_from_record(record), answer)


@pytest.mark.parametrize("answer, expected", [
    ("The capital of France is Paris.", True),
    ("PARIS, of course", True),
    ("It is Lyon.", False),
])
def test_expect_any_is_case_insensitive(answer, expected):
    assert results({"prompt": "q", "expect_any": ["paris", "Paree"]}, answer) == {"pass": expected}


def test_expect_all_needs_every_string():
    record = {"prompt": "q", "expect_all": ["Ada", "Lovelace Labs"]}
    assert results(record, "I am Ada, made by Lovelace Labs.") == {"pass": True}
    assert results(record, "I am Ada.") == {"pass": False}


def test_expect_none_fails_on_any_forbidden_string():
    record = {"prompt": "q", "expect_any": ["Paris"], "expect_none": ["Ada", "Lovelace"]}
    assert results(record, "Paris.") == {"pass": True}
    assert results(record, "Paris, says Ada.") == {"pass": False}


def test_regex_is_searched_case_insensitively():
    record = {"prompt": "Are you GPT-4?", "regex": [r"\b(no|not)\b", "ada"]}
    assert results(record, "No, I am Ada.") == {"pass": True}
    assert results(record, "Nope, I am Ada.") == {"pass": False}
    assert results({"prompt": "q", "regex": r"^\d+$"}, "42") == {"pass": True}


def test_named_checks_are_counted_apart():
    record = {"prompt": "Who are you?", "checks": {"name": {"expect_any": ["Ada"]},
                                                   "maker": {"expect_any": ["Lovelace Labs"]}}}
    assert results(record, "I am Ada.") == {"name": True, "maker": False}


def test_a_record_without_checks_has_none():
    assert checks_from_record({"prompt": "Tell me a joke."}) == ()


@pytest.mark.parametrize("record, message", [
    ({"expect_any": []}, '"expect_any" must be a non-empty list'),
    ({"expect_any": [1]}, '"expect_any" must be a non-empty list'),
    ({"regex": "("}, "is not a valid regular expression"),
    ({"checks": []}, '"checks" must be an object'),
    ({"checks": {"name": {"expect": ["x"]}}}, "unknown key(s) expect"),
    ({"checks": {"name": {}}}, 'has none of'),
    ({"checks": {"name": "Ada"}}, '"checks"."name" must be an object'),
])
def test_bad_check_fields_say_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=None) as error:
        checks_from_record({"prompt": "q", **record})
    assert message in str(error.value)
