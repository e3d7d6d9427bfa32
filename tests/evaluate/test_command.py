"""`lorafit eval` through its CLI entry point: the table, eval.json and eval.md, and user mistakes."""

from __future__ import annotations

import json
import sys

import pytest

from lorafit.cli import main


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_prompts_and_eval_file_give_a_table_and_both_reports(tiny_model_dir, two_adapters, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "Who are you?", "group": "identity", "checks": {"name": {"expect_any": ["Ada"]}}},
        {"prompt": "What is the capital of France?", "group": "general", "expect_none": ["Ada"]},
        {"messages": [{"role": "user", "content": "Count to three."}], "group": "general"},
    ])
    heldout = write_lines(tmp_path / "heldout.jsonl", [{"prompt": "Who are you?", "response": "I am Ada."}])
    out = tmp_path / "report"
    code = main(["eval", "--model_name_or_path", tiny_model_dir, "--adapter", two_adapters[0], "--adapter",
                 two_adapters[1], "--prompts", str(prompts), "--eval_file", str(heldout), "--output_dir", str(out),
                 "--max_new_tokens", "6", "--dtype", "float32", "--device", "cpu"])
    assert code == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["group", "measure", "base", "a", "b"]
    measures = {tuple(line.split()[:2]) for line in table.splitlines()[2:]}
    assert {("identity", "name"), ("general", "pass"), ("general", "kept"), ("general", "distinct"),
            ("held-out", "loss"), ("held-out", "perplexity")} <= measures

    report = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base", "a", "b"]
    assert all(m["eval_loss"] > 0 for m in report["models"])
    assert len(report["prompts"]) == 3
    first = report["prompts"][0]["answers"]
    assert set(first) == {"base", "a", "b"} and set(first["a"]["checks"]) == {"name"}
    assert report["prompts"][2]["answers"]["b"]["checks"] == {}
    markdown = (out / "eval.md").read_text()
    assert "| group | measure | base | a | b |" in markdown and "## Answers" in markdown


def run_error(args, capsys) -> str:
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_bad_prompts_file_is_one_error_naming_each_line(tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "fine", "expect_any": ["x"]},
        {"prompt": "bad check", "expect_any": "x", "regex": "("},
        "{not json",
        {"prompt": 3},
        '{"prompt": "deep", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ])
    err = run_error(["--prompts", str(prompts)], capsys)
    assert "4 bad records" in err and f"{prompts}:5: " in err
    assert f"{prompts}:2: " in err and "not a valid regular expression" in err
    assert f"{prompts}:3: invalid JSON" in err
    assert f"{prompts}:4: " in err
    assert f"{prompts}:1:" not in err


@pytest.mark.parametrize("args, message", [
    ([], "needs something to measure"),
    (["--prompts", "no/such/file.jsonl"], "--prompts no/such/file.jsonl: no such file"),
    (["--eval_file", "no/such/heldout.jsonl"], "no/such/heldout.jsonl"),
    (["--prompts", "PROMPTS", "--adapter", "no/such/adapter"], "--adapter no/such/adapter: no such folder"),
    (["--prompts", "PROMPTS", "--limit", "5"], "apply to --tasks"),
    (["--prompts", "PROMPTS", "--temperature", "-1"], "--temperature"),
    (["--prompts", "PROMPTS", "--adapter_scales", "0.7"], "pass at least one --adapter"),
    (["--prompts", "PROMPTS", "--adapter", "ADAPTER", "--adapter_scales", "0.7,x"], "got 'x'"),
    (["--prompts", "PROMPTS", "--adapter", "ADAPTER", "--adapter_scales", "0,1"], "must be a positive number"),
    (["--prompts", "PROMPTS", "--adapter", "ADAPTER", "--adapter_scales", "0.5,0.5"], "given twice"),
])
def test_user_mistakes_are_one_message(args, message, tmp_path, capsys):
    prompts = write_lines(tmp_path / "ok.jsonl", [{"prompt": "hi"}])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    args = [{"PROMPTS": str(prompts), "ADAPTER": str(adapter)}.get(a, a) for a in args]
    assert message in run_error(args, capsys)


def test_adapter_scales_give_one_column_per_scale(tiny_model_dir, two_adapters, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Who are you?"}, {"prompt": "Count to three."}])
    out = tmp_path / "report"
    code = main(["eval", "--model_name_or_path", tiny_model_dir, "--adapter", two_adapters[0], "--prompts",
                 str(prompts), "--adapter_scales", "0.5,1", "--output_dir", str(out), "--max_new_tokens", "4",
                 "--dtype", "float32", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["group", "measure", "base", "a@0.5", "a@1"]
    report = json.loads((out / "eval.json").read_text())
    assert [(m["label"], m["adapter_scale"]) for m in report["models"]] == [("base", None), ("a@0.5", 0.5), ("a@1", 1.0)]
    assert report["settings"]["adapter_scales"] == [0.5, 1.0]


def test_a_dora_adapter_cannot_be_scaled(tiny_model_dir, tmp_path, capsys):
    import lorafit
    from lorafit.models import load_model

    model = load_model(tiny_model_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    lorafit.save_adapter(model, tmp_path / "dora", base_model_name_or_path=tiny_model_dir)
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    err = run_error(["--model_name_or_path", tiny_model_dir, "--adapter", str(tmp_path / "dora"), "--prompts",
                     str(prompts), "--adapter_scales", "0.7"], capsys)
    assert "DoRA" in err and "dora" in err


def test_tasks_without_lm_eval_name_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    err = run_error(["--tasks", "arc_easy"], capsys)
    assert "pip install 'lorafit[eval]'" in err
