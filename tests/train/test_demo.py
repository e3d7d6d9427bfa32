"""`lorafit demo`: the packaged identity data, and the demo's path on the tiny model (the real run is
the slow test in test_identity_embedded.py, with the same settings)."""

from __future__ import annotations

from lorafit import demo


def test_identity_data_is_filled_in_and_held_out_questions_are_new():
    train = demo.identity_records(demo.TRAIN_RESOURCE, "Ada", "the Analytical Engine Society")
    heldout = demo.identity_records(demo.HELDOUT_RESOURCE, "Ada", "the Analytical Engine Society")
    assert len(train) >= 50 and len(heldout) >= 5
    for record in train + heldout:
        assert "{" not in record["response"]
        assert "Ada" in record["response"] and "the Analytical Engine Society" in record["response"]
    train_prompts = {r["prompt"].lower() for r in train}
    assert not train_prompts & {r["prompt"].lower() for r in heldout}


def test_demo_runs_its_steps_and_reports(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    code = demo.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                      "--num_train_epochs", "0.2", "--max_new_tokens", "3"])
    printed = capsys.readouterr().out
    assert code == 1  # a random tiny model cannot learn a name in a few steps: the demo says so
    assert "before training" in printed and "after training" in printed and "loss plot:" in printed
    for name in ("adapter_model.safetensors", "loss.png", "data/identity.jsonl", "data/identity_heldout.jsonl"):
        assert (out / name).is_file(), name
