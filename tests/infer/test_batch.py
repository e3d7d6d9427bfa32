"""`lorafit generate`: JSONL in, input + "response" out, batched answers equal to one-by-one answers."""

from __future__ import annotations

import json

import pytest

from lorafit import cli
from lorafit.data.render import render_prompt
from lorafit.infer.batch import messages_from_record
from lorafit.infer.generate import generate
from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions

RECORDS = [
    {"prompt": "Name a fruit.", "id": 1},
    {"prompt": "And another?", "system": "Answer in one word.", "history": [["Name a fruit.", "Apple."]], "id": 2},
    {"messages": [{"role": "user", "content": "Hi!"}], "id": 3},
    {"prompt": "Count to three.", "id": 4},
    {"prompt": "What colour is the sky?", "id": 5},
]
FLAGS = ["--temperature", "0", "--max_new_tokens", "6"]


def write_jsonl(path, rows, extra: str = ""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + extra, encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def one_by_one(model_dir, records):
    loaded = load_for_inference(model_dir)
    options = GenerationOptions(temperature=0, max_new_tokens=6)
    answers = []
    for record in records:
        prompt = render_prompt(loaded.tokenizer, messages_from_record(record))
        (completion,) = generate(loaded.model, [prompt], options, stop_token_ids=loaded.stop_token_ids,
                                 pad_token_id=loaded.tokenizer.pad_token_id, tokenizer=loaded.tokenizer)
        answers.append(completion.text)
    return answers


def test_generate_writes_input_plus_response(tiny_model_dir, tmp_path):
    source, output = write_jsonl(tmp_path / "in.jsonl", RECORDS, extra="\n"), tmp_path / "out.jsonl"
    code = cli.main(["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source),
                     "--output", str(output), "--batch_size", "2", *FLAGS])
    assert code == 0
    rows = read_jsonl(output)
    assert [{k: v for k, v in row.items() if k != "response"} for row in rows] == RECORDS
    assert [row["response"] for row in rows] == one_by_one(tiny_model_dir, RECORDS)


def test_seeded_sampling_does_not_depend_on_batch_size_or_resume(tiny_model_dir, tmp_path):
    """Record i samples with seed + i from its own generator, whatever rows run beside it."""
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    sampling = ["--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--max_new_tokens", "6", "--seed", "5"]
    runs = []
    for batch_size, name in ((1, "one.jsonl"), (3, "three.jsonl")):
        output = tmp_path / name
        assert cli.main(["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source),
                         "--output", str(output), "--batch_size", str(batch_size), *sampling]) == 0
        runs.append([row["response"] for row in read_jsonl(output)])
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(json.dumps({**RECORDS[0], "response": runs[0][0]}) + "\n", encoding="utf-8")
    assert cli.main(["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source),
                     "--output", str(resumed), "--batch_size", "2", "--resume", *sampling]) == 0
    assert runs[0] == runs[1] == [row["response"] for row in read_jsonl(resumed)]


def test_resume_keeps_finished_lines_and_drops_a_half_line(tiny_model_dir, tmp_path):
    source, output = write_jsonl(tmp_path / "in.jsonl", RECORDS), tmp_path / "out.jsonl"
    output.write_text(json.dumps({**RECORDS[0], "response": "kept"}) + "\n" + '{"prompt": "And ano', encoding="utf-8")
    args = ["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source), "--output", str(output), *FLAGS]
    assert cli.main(args) == 2  # exists: neither --resume nor --overwrite
    assert cli.main(args + ["--resume"]) == 0
    rows = read_jsonl(output)
    assert len(rows) == len(RECORDS) and rows[0]["response"] == "kept"
    assert [row["id"] for row in rows] == [1, 2, 3, 4, 5]


def test_bad_records_are_listed_with_line_numbers_before_loading(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"prompt": "fine"}\n'
        '{"prompt": 3}\n'
        '\n'
        'not json\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"prompt": "x", "history": [["only one"]]}\n',
        encoding="utf-8",
    )
    code = cli.main(["generate", "--model_name_or_path", str(tmp_path / "no-model"), "--input", str(source),
                     "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 bad records" in err
    for line, reason in [(2, '"prompt"'), (4, "not valid JSON"), (5, "already an assistant reply"), (6, '"history"[0]')]:
        assert f"in.jsonl:{line}: " in err and reason in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size"),
    (["--top_p", "0"], "--top_p"),
    (["--temperature", "-1"], "--temperature"),
])
def test_flag_mistakes_are_user_errors(tmp_path, capsys, flags, message):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    code = cli.main(["generate", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_a_prompt_too_long_for_the_context_is_found_before_any_answer(tiny_model_dir, tmp_path, capsys):
    """Rendering is checked for every record first: no half-written output, and skip applies."""
    rows = RECORDS[:3] + [{"prompt": "word " * 2000, "id": "long"}] + RECORDS[3:]
    source, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    base = ["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source), "--output", str(output),
            "--batch_size", "2", *FLAGS]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert f"{source}:4: the prompt has" in err and "context is 512" in err
    assert not output.exists()
    assert cli.main(base + ["--on_bad_record", "skip"]) == 0
    assert f"skipping {source}:4" in capsys.readouterr().err
    assert [row["id"] for row in read_jsonl(output)] == [1, 2, 3, 4, 5]
