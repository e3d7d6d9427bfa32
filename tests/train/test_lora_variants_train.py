"""`lorafit train` with the LoRA variants: flags, LoRA+ parameter groups, PiSSA runs that resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import lorafit
from lorafit.train import run
from lorafit.train.args import ArgumentsError, LastLayers, parse_train_args
from lorafit.train.trainer import LorafitTrainer
from model_builders import build_tiny_llama


def test_variant_flags_parse_and_bad_values_are_named():
    lora = parse_train_args(["--use_dora", "--init_lora_weights", "pissa_niter_4", "--layers_to_transform",
                             "0,2-4", "--layers_pattern", "layers", "--loraplus_lr_ratio", "16"]).lora
    assert lora.use_dora and lora.init_lora_weights == "pissa_niter_4" and lora.layers_to_transform == [0, 2, 3, 4]
    assert lora.layers_pattern == "layers" and lora.loraplus_lr_ratio == 16
    assert parse_train_args(["--init_lora_weights", "False"]).lora.init_lora_weights is False
    assert parse_train_args([]).lora.init_lora_weights is True
    for argv, message in [(["--init_lora_weights", "svd"], "--init_lora_weights 'svd': expected one of"),
                          (["--layers_to_transform", "9-3"], "--layers_to_transform '9-3'"),
                          (["--layers_to_transform", "a"], "--layers_to_transform 'a'"),
                          (["--layers_pattern", "layers"], "give --layers_to_transform"),
                          (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be positive"),
                          (["--loraplus_lr_ratio", "4", "--use_peft", "false"], "--use_peft false")]:
        with pytest.raises(ArgumentsError, match=message):
            parse_train_args(argv)


def test_the_top_blocks_of_any_model_by_count_or_percent():
    assert parse_train_args(["--layers_to_transform", "last 10"]).lora.layers_to_transform == LastLayers(10)
    assert parse_train_args(["--layers_to_transform", "Last 33%"]).lora.layers_to_transform == LastLayers(33, True)
    assert LastLayers(33, True).indices(30) == list(range(20, 30))  # 9.9 blocks -> 10
    assert LastLayers(33, True).indices(24) == list(range(16, 24))
    assert LastLayers(1, True).indices(12) == [11]  # never none
    assert LastLayers(40).indices(30) == list(range(30))
    for bad in ("last", "last 0", "last 101%", "last -3", "lastly 4"):
        with pytest.raises(ArgumentsError, match="expected 'last N'"):
            parse_train_args(["--layers_to_transform", bad])


def test_last_layers_resolve_to_indices_in_the_adapter_and_rerun_as_written(tmp_path, quick_args):
    out = tmp_path / "top"
    assert run.main(quick_args(out, "--layers_to_transform", "last 50%", "--target_modules", "all-linear")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]  # the tiny model has 2 blocks
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained and all(".layers.1." in key for key in trained)
    assert "layers_to_transform: last 50%" in (out / "lorafit_config.yaml").read_text()


def loraplus_trainer(tmp_path, model, ratio=16.0, **args):
    training = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, use_cpu=True,
                                 report_to="none", **args)
    return LorafitTrainer(model=model, args=training, loraplus_lr_ratio=ratio, loraplus_lr_embedding=1e-5)


def test_loraplus_puts_b_matrices_in_their_own_groups(tmp_path):
    model = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(
        target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]))
    optimizer = loraplus_trainer(tmp_path, model).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {}
    for group in optimizer.param_groups:
        by_kind.setdefault(group["loraplus"], []).append(group)
        for param in group["params"]:
            name = names[id(param)]
            kind = "embedding" if "lora_embedding_" in name else "B" if "lora_B" in name else "A"
            assert group["loraplus"] == kind, name
    assert {g["lr"] for g in by_kind["A"]} == {1e-3}
    assert [g["lr"] for g in by_kind["B"]] == pytest.approx([1.6e-2] * len(by_kind["B"]))
    assert {g["lr"] for g in by_kind["embedding"]} == {1e-5}
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)  # no bias or norm weight trains here
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])


def test_loraplus_rates_hold_through_the_schedule_and_dora_magnitudes_go_with_b(tmp_path):
    model = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    trainer = loraplus_trainer(tmp_path, model, ratio=4.0, lr_scheduler_type="cosine", warmup_steps=2)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    magnitude = model.model.layers[0].self_attn.q_proj.lora_magnitude_vector
    b_group = next(g for g in trainer.optimizer.param_groups if any(p is magnitude for p in g["params"]))
    assert b_group["loraplus"] == "B"
    for _ in range(5):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        rates = {g["loraplus"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert rates["B"] == pytest.approx(4 * rates["A"]) and rates["A"] > 0


def test_without_a_ratio_the_trainer_builds_its_usual_optimizer(tmp_path):
    model = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig())
    optimizer = loraplus_trainer(tmp_path, model, ratio=None).create_optimizer()
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3} and "loraplus" not in optimizer.param_groups[0]


def test_pissa_dora_run_resumes_exactly_and_saves_for_the_original_base(tmp_path, quick_args, tiny_model_dir):
    common = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-2",
              "--lora_dropout", "0.1", "--init_lora_weights", "pissa", "--use_dora", "--lora_rank", "4",
              "--target_modules", "q_proj,v_proj", "--layers_to_transform", "1", "--loraplus_lr_ratio", "8")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run.main(quick_args(whole, *common)) == 0
    config = json.loads((whole / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and config["use_dora"] is True
    assert config["layers_to_transform"] == [1]

    import shutil

    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert run.main(quick_args(resumed, *common, "--resume_from_checkpoint", str(resumed / "checkpoint-2"))) == 0
    expected, actual = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, resumed))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = lorafit.load_adapter(base, whole)
    assert sorted(n for n, _ in lorafit.lora.lora_layers(loaded)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_embed_tokens_in_target_modules_is_trained(tmp_path, quick_args):
    out = tmp_path / "embed"
    assert run.main(quick_args(out, "--target_modules", "q_proj,embed_tokens", "--max_steps", "2",
                               "--learning_rate", "1e-2")) == 0
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].abs().sum() > 0  # it moved from zero
