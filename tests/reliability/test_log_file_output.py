"""Output a log file can hold: with stdout and stderr going to a file, `lorafit train` writes no
carriage return or escape sequence, and one plain line per logging step; `generate`, `chat` (stdin
piped), `merge` and `data inspect` write none either (no "Loading weights" or datasets map bars;
generate's progress is a plain line)."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from reliability_helpers import lorafit_command, subprocess_env

LINE = re.compile(r"^step (\d+)/6 epoch \d+\.\d+ \| loss \d+\.\d+ \| lr \d\.\d\de[-+]\d+ \| grad_norm \d+\.\d+ "
                  r"\| [\d,]+ tok/s(?: \| ETA [\dhms]+)?$")


def test_train_into_a_log_file_has_no_bar_redraws_and_one_line_per_log(tmp_path, run_args):
    argv = [a for a in run_args(tmp_path / "run", "--max_steps", "6") if a not in ("--disable_tqdm", "true")]
    assert "--disable_tqdm" not in argv  # the default: tqdm on, as a user runs it
    log = tmp_path / "train.log"
    with open(log, "wb") as file:
        result = subprocess.run(lorafit_command("train", *argv), stdout=file, stderr=subprocess.STDOUT,
                                env=subprocess_env(), timeout=300)
    text = log.read_bytes()
    assert result.returncode == 0, text[-3000:].decode(errors="replace")
    assert b"\r" not in text and b"\x1b" not in text
    lines = text.decode().splitlines()
    logged = [line for line in lines if line.startswith("step ") and " | loss " in line]
    progress = [LINE.match(line) for line in logged]
    assert all(progress), logged
    assert [int(match.group(1)) for match in progress] == [1, 2, 3, 4, 5, 6]
    assert all("ETA" in match.group(0) for match in progress[1:-1])  # known once a step was timed
    assert any(line.startswith("step 6/6") and "train_loss" in line for line in lines)  # the closing summary


# ---- the inference and data commands ---------------------------------------------------------------

CHAT_TURNS = ["Hello there", "Name three colours."]


def run_into_log(argv, log, stdin: bytes | None = None) -> bytes:
    """Run `lorafit <argv>` with stdout and stderr both going to `log` (as `> log 2>&1` does)."""
    with open(log, "wb") as file:
        result = subprocess.run(lorafit_command(*argv), stdout=file, stderr=subprocess.STDOUT, input=stdin,
                                env=subprocess_env(), timeout=300)
    text = log.read_bytes()
    assert result.returncode == 0, text[-3000:].decode(errors="replace")
    return text


@pytest.fixture(scope="module")
def command_logs(tmp_path_factory, tiny_model_dir, identity_files):
    """The log of one run of each command, with output to a file; chat's expected answers too."""
    import lorafit
    from lorafit.infer.chat import ChatSession
    from lorafit.infer.loading import load_for_inference
    from lorafit.infer.options import GenerationOptions
    from lorafit.models import load_model

    folder = tmp_path_factory.mktemp("command-logs")
    adapter = folder / "adapter"
    lorafit.save_adapter(lorafit.add_lora(load_model(tiny_model_dir), lorafit.LoraConfig()), adapter,
                         base_model_name_or_path=tiny_model_dir)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    model = ["--model_name_or_path", tiny_model_dir]
    runs = {
        "generate": (["generate", *model, "--input", str(prompts), "--output", str(folder / "answers.jsonl"),
                      "--max_new_tokens", "3"], None),
        "chat": (["chat", *model, "--temperature", "0", "--max_new_tokens", "4"],
                 "".join(turn + "\n" for turn in CHAT_TURNS).encode()),
        "merge": (["merge", "--adapter", str(adapter), "--output_dir", str(folder / "merged")], None),
        "data inspect": (["data", "inspect", *model, "--train_file", str(identity_files[0]), "--limit", "2",
                          "--data_cache_dir", str(folder / "fresh-cache")], None),  # a cache miss: map bars
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        logs = dict(zip(runs, pool.map(lambda item: run_into_log(item[1][0], folder / f"{item[0]}.log", item[1][1]),
                                       runs.items())))
    session = ChatSession(load_for_inference(tiny_model_dir), GenerationOptions(temperature=0, max_new_tokens=4))
    answers = [session.reply(turn, lambda _text: None).text for turn in CHAT_TURNS]
    return logs, answers


@pytest.mark.parametrize("command", ["generate", "chat", "merge", "data inspect"])
def test_commands_into_a_log_file_write_no_bar_redraws(command_logs, command):
    logs, answers = command_logs
    text = logs[command]
    if command == "chat":  # the model's own words are passed through as they are: check lorafit's output
        assert all(answer.encode() in text for answer in answers)
        for answer in answers:
            text = text.replace(answer.encode(), b"", 1)
    assert b"\r" not in text and b"\x1b[" not in text, text[-2000:]
    expected = {"generate": b"generate: 3/3 prompts", "merge": b"merge check", "data inspect": b"data summary",
                "chat": b""}[command]
    assert expected in text
