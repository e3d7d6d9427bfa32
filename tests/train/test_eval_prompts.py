"""`lorafit train --eval_prompts`: pass counts at each evaluation in metrics.jsonl, answers in the card;
and `--replay_prompts`: the base model's finished answers, cached, added to the training data."""

from __future__ import annotations

import json

import pytest

from lorafit.cli import main
from lorafit.train.run import main as train_main


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Who are you?", "group": "identity", "checks": {"name": {"expect_any": ["Lorafit"]}}},
        {"prompt": "What is the capital of France?", "group": "general", "expect_none": ["Lorafit"]},
        {"prompt": "Say hi.", "group": "general"},
    ]))
    return path


def test_eval_prompts_counts_go_to_metrics_and_the_card(quick_args, identity_files, prompts_file, tmp_path):
    out = tmp_path / "run"
    _, heldout = identity_files
    assert train_main(quick_args(out, "--validation_file", str(heldout), "--eval_strategy", "steps",
                                 "--eval_steps", "2", "--eval_prompts", str(prompts_file),
                                 "--eval_prompts_max_new_tokens", "4")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "eval_prompts" in r]
    assert [r["step"] for r in probes] == [2, 4]
    for record in probes:
        assert set(record["eval_prompts"]) == {"identity/name", "general/pass"}
        assert record["eval_prompts"]["identity/name"]["total"] == 1
        assert record["eval_prompts"]["general/pass"]["total"] == 1
    answers = json.loads((out / "eval_prompts.json").read_text())
    assert answers["step"] == 4 and len(answers["answers"]) == 3
    assert "## Answers to the evaluation prompts" in (out / "README.md").read_text()
    assert (out / "loss.png").stat().st_size > 0


def test_eval_prompts_without_evaluation_is_one_error(quick_args, prompts_file, tmp_path, capsys):
    assert main(["train", *quick_args(tmp_path / "run", "--eval_prompts", str(prompts_file))]) == 2
    assert "--eval_prompts are answered at each evaluation" in capsys.readouterr().err


def test_a_bad_eval_prompts_file_is_refused_before_training(quick_args, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "regex": "("}\n')
    assert main(["train", *quick_args(tmp_path / "run", "--eval_prompts", str(bad))]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: " in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_replay_adds_the_base_models_finished_answers(quick_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "general.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    args = quick_args(out, "--replay_prompts", str(prompts), "--replay_samples", "4",
                      "--replay_max_new_tokens", "40", "--overwrite_output_dir")
    from lorafit.train import replay

    calls = []
    real = replay.generate_answers

    def counted(*a, **k):
        calls.append(1)
        answers = real(*a, **k)
        return ["a finished answer", None, *answers[2:]]  # the second one did not finish

    monkeypatch.setattr(replay, "generate_answers", counted)
    assert train_main(args) == 0
    cached = list((tmp_path / "home" / "replay").glob("*.jsonl"))
    assert len(cached) == 1
    lines = [json.loads(line) for line in cached[0].read_text().splitlines()]
    assert len(lines) <= 3 and lines[0]["messages"][-1] == {"role": "assistant", "content": "a finished answer"}
    assert str(cached[0]) in (out / "README.md").read_text()  # trained on, and listed in the card
    assert train_main(args) == 0
    assert len(calls) == 1  # the second run reused the cache


def test_the_embedded_models_replay_answers_ship_with_lorafit(embedded_model_path, smol_tokenizer, tmp_path,
                                                              monkeypatch):
    """The persona recipe on the default model trains at once: its replay answers are found under the
    cache key (an edit of the built-in prompts or the chat template without remaking them fails here:
    `python -m lorafit.train.replay`), and nothing is generated."""
    from lorafit.data.templates import set_chat_template
    from lorafit.train import replay

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("lorafit.models.embedded_model_dir", lambda: __import__("pathlib").Path(embedded_model_path))

    def refuse(*a, **k):
        raise AssertionError("generated answers that ship with lorafit")

    monkeypatch.setattr(replay, "generate_answers", refuse)
    set_chat_template(smol_tokenizer, "auto")
    path = replay.replay_file(embedded_model_path, smol_tokenizer, replay.BUILTIN, max_new_tokens=128)
    assert path.parent.name == replay.SHIPPED_FOLDER
    builtin = [json.loads(line)["prompt"] for line in replay.prompts_path(replay.BUILTIN).read_text().splitlines()]
    shipped = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    assert len(shipped) >= len(builtin) // 2
    assert all(m[0]["content"] in builtin and m[-1]["role"] == "assistant" and m[-1]["content"] for m in shipped)
    other = tmp_path / "other-model"  # any other base: no shipped answers under its key
    assert replay.shipped_file(replay.cache_file(str(other), smol_tokenizer, [shipped[0][:1]], 128)) is None
