"""Bad input through the real CLI (promise 5): training data (`lorafit train`, `lorafit data
inspect`), `lorafit generate` input files and `lorafit chat` stdin. A bad line is one message naming it, exit code 2, no traceback, and nothing generated from
a file with bad records unless `--on_bad_record skip`. Piped chat input that cannot be answered
(not UTF-8, too long for the context) is named by line as it happens and the run exits 2; input
that is fine but odd (control characters, a byte order mark, no final newline, nothing) is answered."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from reliability_helpers import lorafit_command, subprocess_env

GOOD = json.dumps({"prompt": "Name a colour."}).encode()
# (what is wrong, the line's bytes, a phrase of the reason)
BAD_LINES = [
    ("invalid UTF-8", b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    ("truncated JSON", b'{"prompt": "Name a', "not valid JSON"),
    ("raw control character", b'{"prompt": "a\x00b"}', "must be written escaped"),
    ("deep nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ("huge number", b'{"prompt": 1' + b"0" * 5000 + b"}", "more than 4300 digits"),
    ("lone surrogate", b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    ("wrong type", b'{"prompt": 5}', 'needs a string "prompt"'),
    ("null message content", b'{"messages": [{"role": "user", "content": null}]}', '"messages"[0]'),
    ("not an object", b'["Name a colour."]', "expected a JSON object, got an array"),
    ("nothing to answer", b'{"messages": [{"role": "assistant", "content": "hi"}]}', "already an assistant reply"),
]


def run_cli(argv, stdin: bytes = b""):
    return subprocess.run(lorafit_command(*argv), input=stdin, capture_output=True, env=subprocess_env(), timeout=300)


def one_error(result, command: str) -> str:
    """The stderr of a run that failed as promised: exit 2, no traceback, one `error:` message."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.count(f"lorafit {command}: error:") == 1, stderr[-2000:]
    return stderr


@pytest.fixture(scope="module")
def generate_runs(tmp_path_factory, tiny_model_dir):
    """One `generate` run over a file holding every bad line between good ones, and the same with skip."""
    folder = tmp_path_factory.mktemp("generate-input")
    lines = [b"\xef\xbb\xbf" + GOOD]  # a byte order mark first: just skipped
    for _, raw, _ in BAD_LINES:
        lines += [raw, GOOD]
    prompts = folder / "prompts.jsonl"
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    common = ["--model_name_or_path", tiny_model_dir, "--input", str(prompts), "--max_new_tokens", "2",
              "--temperature", "0"]
    stopped, skipped = folder / "stopped.jsonl", folder / "skipped.jsonl"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run_cli, [["generate", *common, "--output", str(stopped)],
                                          ["generate", *common, "--output", str(skipped), "--on_bad_record", "skip"]]))
    return prompts, stopped, skipped, results


def test_generate_lists_every_bad_line_and_writes_nothing(generate_runs):
    prompts, stopped, _, (result, _) = generate_runs
    stderr = one_error(result, "generate")
    assert f"{len(BAD_LINES)} bad records" in stderr
    for index, (what, _, phrase) in enumerate(BAD_LINES):
        line = 2 * index + 2
        assert any(text.startswith(f"{prompts}:{line}: ") and phrase in text for text in stderr.splitlines()), what
    assert not stopped.exists()


def test_generate_with_skip_answers_the_good_lines_and_names_the_others(generate_runs):
    prompts, _, skipped, (_, result) = generate_runs
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    answers = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == len(BAD_LINES) + 1 and all(a["prompt"] == "Name a colour." for a in answers)
    skipped_lines = [text.split(": ")[0] for text in stderr.splitlines() if text.startswith("skipping ")]
    assert skipped_lines == [f"skipping {prompts}:{2 * index + 2}" for index in range(len(BAD_LINES))]


# Training data: lines the reader once let escape as exceptions, between good records.
TRAIN_GOOD = json.dumps({"prompt": "What is 2+2?", "response": "4."}).encode()
TRAIN_BAD_LINES = [
    (b'{"prompt": "\\ud800", "response": "x"}', "field prompt holds a lone UTF-16 surrogate"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"prompt": 1' + b"0" * 5000 + b', "response": "x"}', "more than 4300 digits"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "invalid UTF-8 (byte 0xe9"),
    (json.dumps({"instruction": "Hi", "output": "Hello"}).encode(), "keep one format per file"),
    (b'{"prompt": "a", "response": null}', "missing field 'response'"),
]


def test_train_and_data_inspect_list_every_bad_line_and_write_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join([TRAIN_GOOD, *(raw for raw, _ in TRAIN_BAD_LINES), TRAIN_GOOD]) + b"\n")
    common = ["--model_name_or_path", tiny_model_dir, "--train_file", str(data),
              "--data_cache_dir", str(tmp_path / "cache")]
    runs = {"train": ["train", *common, "--output_dir", str(tmp_path / "run"), "--max_steps", "1"],
            "data": ["data", "inspect", *common, "--output_dir", str(tmp_path / "inspect")]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(run_cli, runs.values())))
    for command, result in results.items():
        stderr = one_error(result, command)
        assert f"{len(TRAIN_BAD_LINES)} bad records" in stderr
        for line, (_, phrase) in enumerate(TRAIN_BAD_LINES, start=2):
            assert any(text.startswith(f"{data}:{line}: ") and phrase in text for text in stderr.splitlines()), phrase
    assert not (tmp_path / "inspect").exists() and not (tmp_path / "cache").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lorafit_config.yaml"]  # nothing from the data


CHAT_CASES = [
    # (name, stdin, exit code, answer lines on stdout, phrases in stderr): a line that gets no answer
    # is named as it happens and gets an empty answer line; the chat goes on and exits 2 at the end.
    ("invalid UTF-8 on line 2", b"Hello\n\xff\xfe hi\nStill here?\n", 2, 3,
     ["stdin line 2: invalid UTF-8 (byte 0xff", "1 line of stdin got no answer (line 2"]),
    ("a line too long for the context", b"Hi\n" + b"word " * 200_000 + b"\nAnd now?\n", 2, 3,
     ["stdin line 2: this message is too long", "1 line of stdin got no answer (line 2"]),
    ("control characters", b"\x1b[2J\x00\x07 hi\x0b\x7f\r\n", 0, 1, None),
    ("byte order mark, no final newline", b"\xef\xbb\xbfHello\nAgain", 0, 2, None),
    ("empty stdin", b"", 0, 0, None),
]


@pytest.fixture(scope="module")
def chat_runs(tiny_model_dir):
    argv = ["chat", "--model_name_or_path", tiny_model_dir, "--max_new_tokens", "2", "--temperature", "0"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([case[0] for case in CHAT_CASES],
                        pool.map(lambda case: run_cli(argv, case[1]), CHAT_CASES)))


@pytest.mark.parametrize("name, stdin, code, answers, phrases", CHAT_CASES, ids=[case[0] for case in CHAT_CASES])
def test_chat_stdin(chat_runs, name, stdin, code, answers, phrases):
    result = chat_runs[name]
    if code == 2:
        stderr = one_error(result, "chat")
        assert all(phrase in stderr for phrase in phrases), stderr[-2000:]
    else:
        stderr = result.stderr.decode("utf-8", "replace")
        assert result.returncode == 0 and "Traceback" not in stderr and "error" not in stderr, stderr[-2000:]
    assert result.stdout.count(b"\n") == answers  # one answer line per message answered before the stop
