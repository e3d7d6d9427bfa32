"""Output a log file can hold: with stdout and stderr going to a file, `lorafit train` writes no
carriage return or escape sequence, and one plain line per logging step."""

from __future__ import annotations

import re
import subprocess

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
