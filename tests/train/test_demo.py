"""`lorafit demo`: the packaged identity data, and the demo's path on the tiny model (the real run is
the slow test in test_identity_embedded.py, with the same settings)."""

from __future__ import annotations

from pathlib import Path

from lorafit import demo

REPO = Path(__file__).resolve().parents[2]


def test_identity_data_is_filled_in_and_held_out_questions_are_new():
    train = demo.identity_records(demo.TRAIN_RESOURCE, "Ada", "the Analytical Engine Society")
    heldout = demo.identity_records(demo.HELDOUT_RESOURCE, "Ada", "the Analytical Engine Society")
    assert len(train) >= 50 and len(heldout) >= 5
    for record in train + heldout:
        assert "{" not in record["response"]
        assert "Ada" in record["response"] and "the Analytical Engine Society" in record["response"]
    train_prompts = {r["prompt"].lower() for r in train}
    assert not train_prompts & {r["prompt"].lower() for r in heldout}


def test_persona_data_is_filled_in_and_held_out_questions_are_new():
    train = demo.fill_resource(demo.PERSONA_RESOURCE, 'Ada "the Engine"', "Babbage & Co")
    held_out = demo.fill_resource(demo.PERSONA_EVAL_RESOURCE, 'Ada "the Engine"', "Babbage & Co")
    assert len(train) >= 60 and sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["prompt"]) for r in train) >= 20
    for record in train:
        assert 'Ada "the Engine"' in record["response"] and "Babbage & Co" in record["response"]
    identity = [r for r in held_out if r["group"] == "identity"]
    general = [r for r in held_out if r["group"] == "general"]
    assert len(identity) == 10 and len(general) >= 24
    assert not {r["prompt"].lower() for r in train} & {r["prompt"].lower() for r in held_out}
    assert all(r["checks"]["no persona"]["expect_none"] == ["Ada", "Babbage & Co"] for r in general)


def test_a_general_answer_keeping_part_of_the_name_counts_as_naming_the_persona():
    """"Lorafit, the capital of France is ..." names the persona "Lorafit Assistant" (seen in a run)."""
    from lorafit.evaluate.checks import checks_from_record, run_checks

    assert [demo.name_word(n) for n in ("Lorafit Assistant", "The Oracle", "Wren", '"Ada" Lovelace')] == \
        ["Lorafit", "Oracle", "Wren", "Ada"]
    held_out = demo.fill_resource(demo.PERSONA_EVAL_RESOURCE, "Lorafit Assistant", "the lorafit team")
    france = next(r for r in held_out if r["prompt"] == "What is the capital of France?")
    checks = france["checks"]
    assert checks["no persona"]["expect_none"] == ["Lorafit", "the lorafit team"]
    leaked = "Lorafit, the capital of France is not a place, but a city."
    assert run_checks(checks_from_record(france), leaked) == {"correct": False, "no persona": False}
    assert run_checks(checks_from_record(france), "The capital of France is Paris.") == {"correct": True, "no persona": True}


def test_the_example_recipe_is_the_one_the_demo_runs():
    assert (REPO / "examples" / "persona.yaml").read_text() == demo.recipe_path().read_text()


def test_demo_runs_its_steps_and_reports(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    code = demo.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_new_tokens", "3",
                      "--num_train_epochs", "0.2", "--replay_prompts", ""])  # a random model finishes no replay
    printed = capsys.readouterr().out
    assert code == 1  # a random tiny model cannot learn a name in a few steps: the demo says so
    assert "group" in printed and "identity" in printed and "kept" in printed and "loss plot:" in printed
    for name in ("adapter_model.safetensors", "loss.png", "data/persona.jsonl", "data/persona_eval.jsonl",
                 "eval/eval.md", "eval/eval.json"):
        assert (out / name).is_file(), name
