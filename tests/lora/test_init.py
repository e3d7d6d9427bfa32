"""PiSSA and OLoRA: the same split as PEFT, and saved adapters that apply to the original base."""

import copy
import json
import warnings

import peft
import pytest
import torch

import lorafit
from lorafit.errors import UserError
from lorafit.lora.adapter_io import read_tensors_for
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from test_adapter_io import logits, peft_model

KWARGS = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def train_a_little(model, steps=3, lr=1e-2):
    """A few real optimizer steps, so A and B move away from their initial values."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_split_equals_peft_and_keeps_the_model_unchanged(init):
    base = build_tiny_llama()
    expected = logits(base)
    theirs = peft_model(copy.deepcopy(base), {**KWARGS, "init_lora_weights": init})
    ours = lorafit.add_lora(base, lorafit.LoraConfig(**KWARGS, init_lora_weights=init))
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    theirs_state = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, theirs_state[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("builder,kwargs", [
    (build_tiny_llama, {**KWARGS, "init_lora_weights": "pissa"}),
    (build_tiny_llama, {**KWARGS, "init_lora_weights": "olora", "use_rslora": True}),
    (build_tiny_llama, {**KWARGS, "init_lora_weights": "pissa_niter_4", "modules_to_save": ["lm_head"]}),
    (build_tiny_llama, {**KWARGS, "init_lora_weights": "pissa", "use_dora": True}),
    (build_tiny_qwen2, {**KWARGS, "init_lora_weights": "olora", "rank_pattern": {"down_proj": 2},
                        "alpha_pattern": {"v_proj": 4}}),
    (build_tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "r": 4, "init_lora_weights": "pissa",
                       "fan_in_fan_out": True}),
], ids=["pissa", "olora-rslora", "pissa-niter-modules-to-save", "pissa-dora", "olora-patterns", "pissa-gpt2"])
def test_trained_adapter_applies_to_the_original_base(tmp_path, builder, kwargs):
    trained = train_a_little(lorafit.add_lora(builder(), lorafit.LoraConfig(**kwargs)))
    expected = logits(trained)
    lorafit.save_adapter(trained, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * kwargs["r"] and config["init_lora_weights"] is True
    ours = lorafit.load_adapter(builder(), tmp_path).eval()  # an unmodified base model
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(builder(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)


def test_saved_file_equals_peft_conversion(tmp_path):
    """Same weights, saved by PEFT with path_initial_model_for_weight_conversion and by lorafit."""
    theirs = peft_model(build_tiny_llama(), {**KWARGS, "init_lora_weights": "pissa"})
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    ours = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(**KWARGS, init_lora_weights="pissa"))
    train_a_little(theirs)
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                ours_params[name.replace("base_model.model.", "").replace(".default", "")].copy_(param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lorafit.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    mine, reference = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == reference.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=1e-6, rtol=1e-5, msg=key)
    mine_config, reference_config = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                                     for d in ("ours", "theirs"))
    for key in ("r", "lora_alpha", "init_lora_weights"):
        assert mine_config[key] == reference_config[key], key


def test_peft_pissa_adapter_saved_for_the_residual_loads_in_lorafit(tmp_path):
    theirs = train_a_little(peft_model(build_tiny_llama(), {**KWARGS, "init_lora_weights": "pissa"}))
    theirs.save_pretrained(tmp_path)  # no conversion: applies to the residual PEFT recomputes at load
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ours = lorafit.load_adapter(build_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_a_checkpoint_resumes_to_the_trained_halves(tmp_path):
    config = lorafit.LoraConfig(**KWARGS, init_lora_weights="olora")
    trained = train_a_little(lorafit.add_lora(build_tiny_llama(), config))
    lorafit.save_adapter(trained, tmp_path)
    resumed = lorafit.add_lora(build_tiny_llama(), config)  # the same split of the same base
    tensors = read_tensors_for(resumed, tmp_path)
    for key, tensor in lorafit.lora.adapter_io.adapter_state_dict(trained).items():
        torch.testing.assert_close(tensors[key], tensor.detach(), atol=1e-6, rtol=0)
    other = lorafit.add_lora(build_tiny_llama(seed=3), config)
    with pytest.raises(UserError, match="another base model"):
        read_tensors_for(other, tmp_path)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init_lora_weights"):
        lorafit.LoraConfig(init_lora_weights="pissa_niter_")
    with pytest.raises(ValueError, match="init_lora_weights"):
        lorafit.LoraConfig(init_lora_weights="loftq")
