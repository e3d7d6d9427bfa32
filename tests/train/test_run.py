"""`lorafit train` end to end on the tiny model: outputs, evaluation, loss normalisation, recipe flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorafit
from lorafit.errors import UserError
from lorafit.models import load_model
from lorafit.train import run


def losses(output_dir, key="loss"):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r.get(key) is not None]


def adapter_tensors(output_dir):
    return load_file(str(output_dir / "adapter_model.safetensors"))


def test_a_run_writes_every_output(tmp_path, quick_args, tiny_model_dir, identity_files):
    _, heldout = identity_files
    out = tmp_path / "run"
    assert run.main(quick_args(out, "--validation_file", str(heldout), "--eval_strategy", "steps",
                               "--eval_steps", "2", "--learning_rate", "1e-2")) == 0

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "lorafit_config.yaml", "metrics.jsonl", "loss.png", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # an adapter, not a copy of the base

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_model_dir
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                         "q_proj", "up_proj", "v_proj"]  # all-linear
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4]
    for key in ("epoch", "lr", "grad_norm", "trained_tokens", "tokens_per_second"):
        assert all(key in r for r in train_logs[1:]), key
    assert train_logs[-1]["trained_tokens"] > train_logs[0]["trained_tokens"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # no duplicate final evaluation
    for record in evals:
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]), rel=1e-6)
    assert losses(out)[-1] < losses(out)[0]

    # The saved adapter, on a fresh base, is the trained model; the saved tokenizer has its template.
    config = yaml.safe_load((out / "lorafit_config.yaml").read_text())
    assert config["learning_rate"] == 0.01 and config["train_file"]
    card = (out / "README.md").read_text()
    assert tiny_model_dir in card and "PeftModel.from_pretrained" in card and "eval loss" in card
    model = lorafit.load_adapter(load_model(tiny_model_dir), out)
    assert any(layer.lora_B.weight.abs().sum() > 0 for _, layer in lorafit.lora.lora_layers(model))


def test_output_dir_of_a_finished_run_is_not_overwritten_silently(tmp_path, quick_args):
    out = tmp_path / "run"
    run.main(quick_args(out, "--max_steps", "1"))
    with pytest.raises(UserError, match="already holds a run.*--overwrite_output_dir"):
        run.main(quick_args(out, "--max_steps", "1"))
    assert run.main(quick_args(out, "--max_steps", "1", "--overwrite_output_dir")) == 0


def test_loss_is_a_mean_over_trained_tokens_across_accumulation_steps(tmp_path, quick_args):
    """4 examples as 1x4, 2x2 or 4x1 micro-batches give the same gradient, hence the same SGD step.

    The examples differ in length and in trained tokens, so a mean of micro-batch means (the
    classic accumulation bug) would differ. SGD without clipping makes the update the gradient.
    """
    results = []
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}"
        run.main(quick_args(out, "--max_steps", "1", "--per_device_train_batch_size", str(batch),
                            "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd",
                            "--learning_rate", "1", "--max_grad_norm", "0", "--warmup_steps", "0",
                            "--lora_dropout", "0", "--lr_scheduler_type", "constant"))
        results.append((adapter_tensors(out), losses(out)[0]))
    (reference, reference_loss), *others = results
    for tensors, loss in others:
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        for key, value in reference.items():
            torch.testing.assert_close(tensors[key], value, rtol=1e-4, atol=1e-6)


def test_native_and_peft_give_the_same_loss_curve(tmp_path, quick_args):
    # Without dropout: lorafit draws its (cheaper) dropout masks differently from PEFT's nn.Dropout.
    curves = {}
    for impl in ("native", "peft"):
        out = tmp_path / impl
        run.main(quick_args(out, "--lora_impl", impl, "--max_steps", "6", "--learning_rate", "1e-2",
                            "--lora_dropout", "0"))
        curves[impl] = losses(out)
        assert (out / "adapter_config.json").is_file()
    assert len(curves["native"]) == 6
    assert curves["native"] == pytest.approx(curves["peft"], rel=1e-4)
    assert curves["native"][-1] < curves["native"][0]


def test_peft_path_continues_an_adapter(tmp_path, quick_args):
    first = tmp_path / "first"
    run.main(quick_args(first, "--learning_rate", "1e-2"))
    # Learning rate 0: the continued adapter must come back exactly as it was loaded.
    frozen = tmp_path / "frozen"
    run.main(quick_args(frozen, "--peft_path", str(first), "--learning_rate", "0", "--max_steps", "1"))
    for key, value in adapter_tensors(first).items():
        torch.testing.assert_close(adapter_tensors(frozen)[key], value, rtol=0, atol=0)
    # And it trains: the first loss of the continued run is the trained adapter's, not a fresh one's.
    continued = tmp_path / "continued"
    run.main(quick_args(continued, "--peft_path", str(first), "--learning_rate", "1e-2", "--max_steps", "1"))
    fresh = tmp_path / "fresh"
    run.main(quick_args(fresh, "--learning_rate", "1e-2", "--max_steps", "1"))
    assert losses(continued)[0] < losses(fresh)[0] - 1e-3


def test_adapter_scale_saves_the_trained_update_times_the_factor(tmp_path, quick_args, identity_files):
    _, heldout = identity_files
    runs = {scale: tmp_path / f"scale_{scale}" for scale in ("1", "0.5")}
    for scale, out in runs.items():
        assert run.main(quick_args(out, "--learning_rate", "1e-2", "--adapter_scale", scale,
                                   "--validation_file", str(heldout))) == 0
    trained, scaled = adapter_tensors(runs["1"]), adapter_tensors(runs["0.5"])
    assert trained.keys() == scaled.keys()
    for key, tensor in trained.items():
        expected = tensor * 0.5 if "lora_B" in key else tensor
        torch.testing.assert_close(scaled[key], expected, rtol=1e-6, atol=0, msg=key)
    # the last evaluation is the saved adapter's: closer to the base's loss than the trained one's
    assert losses(runs["0.5"], "eval_loss")[-1] != losses(runs["1"], "eval_loss")[-1]
    assert "times 0.5" in (runs["0.5"] / "README.md").read_text()
    assert yaml.safe_load((runs["0.5"] / "lorafit_config.yaml").read_text())["adapter_scale"] == 0.5


def test_recipe_truncation_and_prompt_type_take_effect(tmp_path, quick_args):
    limited, unlimited = tmp_path / "limited", tmp_path / "unlimited"
    run.main(quick_args(limited, "--max_steps", "1", "--max_target_length", "4", "--max_source_length", "8",
                        "--prompt_type", "standard_alpaca", "--overwrite_cache", "--ignore_pad_token_for_loss", "true"))
    run.main(quick_args(unlimited, "--max_steps", "1", "--prompt_type", "standard_alpaca"))
    first_limited = json.loads((limited / "metrics.jsonl").read_text().splitlines()[0])
    first_unlimited = json.loads((unlimited / "metrics.jsonl").read_text().splitlines()[0])
    # The same 4 examples in step 1: at most 4 response tokens each, and prompts cut to 8 tokens a turn.
    assert first_limited["trained_tokens"] <= 4 * 4 < first_unlimited["trained_tokens"]
    assert first_limited["num_input_tokens_seen"] < first_unlimited["num_input_tokens_seen"] / 2
    cut = next(line for line in (limited / "README.md").read_text().splitlines() if "responses cut" in line)
    assert int(cut.split()[2]) > 0  # the summary says how many answers the limit cut
    assert "### Response:" in (limited / "chat_template.jinja").read_text()  # the alpaca template was saved


def test_full_fine_tuning_saves_a_full_model(tmp_path, quick_args, tiny_model_dir):
    out = tmp_path / "full"
    run.main(quick_args(out, "--use_peft", "false", "--max_steps", "1", "--warmup_steps", "0"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    before, after = load_model(tiny_model_dir).state_dict(), load_model(str(out)).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_trains_the_adapter_identically(tmp_path, quick_args):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    run.main(quick_args(plain, "--learning_rate", "1e-2", "--lora_dropout", "0"))
    run.main(quick_args(checkpointed, "--learning_rate", "1e-2", "--lora_dropout", "0", "--gradient_checkpointing"))
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    for key, value in adapter_tensors(plain).items():
        torch.testing.assert_close(adapter_tensors(checkpointed)[key], value, rtol=1e-4, atol=1e-6)


def test_a_run_stopped_by_bad_data_does_not_block_its_folder(tmp_path, quick_args):
    out = tmp_path / "run"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi"}\n')
    args = quick_args(out, "--max_steps", "1")
    with pytest.raises(UserError):
        run.main(args[:args.index("--train_file") + 1] + [str(broken)] + args[args.index("--train_file") + 2:])
    assert (out / "lorafit_config.yaml").exists() and not (out / "metrics.jsonl").exists()
    assert run.main(args) == 0  # the corrected rerun goes ahead in the same folder


@pytest.mark.parametrize("flags, hinted", [((), True), (("--bf16", "true"), False)])
def test_a_cpu_with_bf16_units_gets_a_hint_to_train_in_bf16(tmp_path, quick_args, monkeypatch, caplog, flags, hinted):
    from lorafit.train import model_setup

    monkeypatch.setattr(model_setup, "cpu_has_bf16_units", lambda: True)
    with caplog.at_level("INFO", logger="lorafit.train.model_setup"):
        assert run.main(quick_args(tmp_path / "run", "--max_steps", "1", *flags)) == 0
    assert ("--bf16 true trains faster" in caplog.text) == hinted


def test_no_bf16_hint_for_a_run_headed_for_an_accelerator(tmp_path, quick_args, monkeypatch, caplog):
    from lorafit.train import model_setup

    monkeypatch.setattr(model_setup, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(model_setup, "has_accelerator", lambda: True)  # the run moves to a GPU after loading
    with caplog.at_level("INFO", logger="lorafit.train.model_setup"):
        assert run.main(quick_args(tmp_path / "run", "--max_steps", "1", "--use_cpu", "false")) == 0
    assert "--bf16 true trains faster" not in caplog.text
