"""`lorafit data inspect`: JSON lines of what training sees, highlighted text, summary, exit 2 on bad data."""

from __future__ import annotations

import json

from data_helpers import A1, A2, RECORDS, write_jsonl

from lorafit.cli import main

EOT = "<|im_end|>"


def run(capsys, *argv):
    code = main(["data", "inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_output_file_has_one_line_per_example(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [RECORDS["sharegpt"], RECORDS["sharegpt"]])
    output = tmp_path / "inspect" / "examples.jsonl"
    code, out, _ = run(capsys, "--model_name_or_path", tiny_model_dir, "--train_file", str(data),
                       "--output", str(output), "--data_cache_dir", str(tmp_path / "cache"))
    assert code == 0 and "wrote 2 examples" in out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["source"] for line in lines] == [f"{data}:1", f"{data}:2"]
    first = lines[0]
    assert set(first) == {"source", "input_ids", "labels", "text"} and first["text"].endswith(f"{A2}{EOT}\n")
    assert len(first["input_ids"]) == len(first["labels"])
    assert "records read        2" in out and "padding efficiency" in out


def test_terminal_view_highlights_trained_spans(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [RECORDS["messages"]] * 7)
    code, out, _ = run(capsys, "--train_file", str(data), "--template", "chatml", "--limit", "1",
                       "--data_cache_dir", str(tmp_path / "cache"), "--packing")
    assert code == 0
    assert out.count("── ") == 1 and f"assistant\n«{A1}{EOT}»\n" in out and f"«{A2}{EOT}»" in out
    assert "template            chatml" in out and "padding efficiency  100.0% (packing" in out


def test_bad_records_exit_2_with_lines_and_no_traceback(tmp_path, capsys):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}],
                       raw_lines={1: b"{oops"})
    code, out, err = run(capsys, "--train_file", str(data), "--data_cache_dir", str(tmp_path / "cache"))
    assert code == 2 and "Traceback" not in err
    assert f"{data}:2: invalid JSON" in err and f"{data}:3: missing field 'response'" in err
    code, out, err = run(capsys, "--train_file", str(data), "--data_cache_dir", str(tmp_path / "cache"),
                         "--on_bad_record", "skip", "--output_dir", str(tmp_path / "out"))
    assert code == 0 and len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 2


def test_argument_mistakes(capsys):
    code, _, err = run(capsys, "--train_fle", "x.jsonl")
    assert code == 2 and "did you mean --train_file?" in err
    code, _, err = run(capsys, "--train_file", "/nonexistent/x.jsonl")
    assert code == 2 and "no such file" in err
    assert main(["data", "peek"]) == 2
