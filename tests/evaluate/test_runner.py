"""Base and adapter columns from one loaded model equal what each model answers when loaded alone."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.data.render import render_prompt
from lorafit.evaluate.prompts import prompt_from_record
from lorafit.evaluate.runner import column_labels, evaluate_columns
from lorafit.infer.generate import generate
from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions
from lorafit.models import load_model

GREEDY = GenerationOptions(max_new_tokens=10, temperature=0)
QUESTIONS = ["Who are you?", "What is the capital of France?", "Count to five.", "Name a colour."]


def alone(base_dir, adapter, prompts):
    loaded = load_for_inference(base_dir, adapter, dtype="float32", device="cpu")
    rendered = [render_prompt(loaded.tokenizer, list(p.messages)) for p in prompts]
    completions = generate(loaded.model, rendered, GREEDY, stop_token_ids=loaded.stop_token_ids,
                           pad_token_id=loaded.tokenizer.pad_token_id, tokenizer=loaded.tokenizer)
    return [c.text.strip() for c in completions]


def test_columns_equal_separately_loaded_models(tiny_model_dir, two_adapters):
    prompts = [prompt_from_record({"prompt": q, "expect_any": ["Paris"]}, f"t:{i}") for i, q in enumerate(QUESTIONS)]
    adapters = [Path(a) for a in two_adapters]
    results = evaluate_columns(tiny_model_dir, adapters, column_labels(adapters), prompts=prompts, options=GREEDY,
                               dtype="float32", device="cpu", batch_size=3)
    assert [r.label for r in results] == ["base", "a", "b"]
    expected = [alone(tiny_model_dir, None, prompts)] + [alone(tiny_model_dir, a, prompts) for a in two_adapters]
    assert [r.answers for r in results] == expected
    assert expected[0] != expected[1] and expected[1] != expected[2]  # the adapters do change the answers
    assert all(len(r.checks) == len(prompts) for r in results)


def test_eval_loss_per_column_matches_a_direct_computation(tiny_model_dir, two_adapters):
    import lorafit
    from lorafit.data.render import labels_for, tokenize_conversation
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.infer.loading import load_inference_tokenizer

    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ada."}]
    adapter = Path(two_adapters[0])
    results = evaluate_columns(tiny_model_dir, [adapter], ["base", "a"], prompts=[], options=GREEDY,
                               conversations=[conversation], dtype="float32", device="cpu")
    tokenizer = load_inference_tokenizer(tiny_model_dir, adapter)
    rendered = tokenize_conversation(tokenizer, conversation, end_of_turn_ids=end_of_turn_token_ids(tokenizer))
    ids, labels = torch.tensor([rendered.input_ids]), torch.tensor([labels_for(rendered)])
    for result, with_adapter in zip(results, [False, True]):
        model = load_model(tiny_model_dir)
        if with_adapter:
            lorafit.load_adapter(model, adapter)
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert abs(result.eval_loss - expected) < 1e-4
        assert result.eval_tokens == int((labels[0, 1:] != -100).sum())


def scaled_copy(adapter: str, factor: float, folder: Path) -> Path:
    """The adapter with lora_alpha (and any per-module alpha) times `factor`: how PEFT would read a scaled update."""
    import json
    import shutil

    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] *= factor
    config["alpha_pattern"] = {key: value * factor for key, value in (config.get("alpha_pattern") or {}).items()}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_scaled_column_equals_the_adapter_saved_with_its_update_scaled(tiny_model_dir, two_adapters, tmp_path):
    prompts = [prompt_from_record({"prompt": q}, f"t:{i}") for i, q in enumerate(QUESTIONS)]
    adapter = Path(two_adapters[0])
    results = evaluate_columns(tiny_model_dir, [adapter, adapter, adapter], ["base", "a@0.3", "a@1", "a@0.6"],
                               scales=[0.3, 1.0, 0.6], prompts=prompts, options=GREEDY, dtype="float32",
                               device="cpu", batch_size=4)
    assert [r.adapter_scale for r in results] == [1.0, 0.3, 1.0, 0.6]
    expected = [alone(tiny_model_dir, str(scaled_copy(two_adapters[0], t, tmp_path / f"x{t}")), prompts)
                for t in (0.3, 0.6)]
    assert results[1].answers == expected[0] and results[3].answers == expected[1]
    assert results[2].answers == alone(tiny_model_dir, two_adapters[0], prompts)
    assert len({tuple(r.answers) for r in results}) > 2  # the scale does change the answers
