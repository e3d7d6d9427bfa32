"""The trainable-parameter line equals PEFT's, character for character, for the same config."""

import contextlib
import io
import warnings

import peft
import pytest

import lorafit
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": "all-linear"},
    {"target_modules": r".*\.(q_proj|o_proj|down_proj)"},
    {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": "all-linear", "modules_to_save": ["embed_tokens"]},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "r": 4, "use_rslora": True},
    {"target_modules": "all-linear", "use_dora": True},
    {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"},
    {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": "olora", "use_dora": True},
]
GPT2_CONFIGS = [
    {"target_modules": ["c_attn"]},
    {"target_modules": "all-linear"},
    {"target_modules": ["c_attn", "c_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["c_attn", "wte"], "use_dora": False, "layers_to_transform": None},
    {"target_modules": ["c_attn"], "use_dora": True},
]


def printed(print_fn) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_fn()
    return buffer.getvalue()


def peft_line(model, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    return printed(wrapped.print_trainable_parameters)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: str(k))
def test_trainable_line_matches_peft(builder, kwargs):
    ours = lorafit.add_lora(builder(), lorafit.LoraConfig(**kwargs))
    assert printed(lambda: lorafit.print_trainable_parameters(ours)) == peft_line(builder(), kwargs)


@pytest.mark.parametrize("kwargs", GPT2_CONFIGS, ids=lambda k: str(k))
def test_trainable_line_matches_peft_gpt2_conv1d(kwargs):
    ours = lorafit.add_lora(build_tiny_gpt2(), lorafit.LoraConfig(**kwargs))
    assert printed(lambda: lorafit.print_trainable_parameters(ours)) == peft_line(build_tiny_gpt2(), kwargs)


def test_line_format_is_peft_exactly(tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    trainable, total = lorafit.trainable_parameters(tiny_llama)
    line = printed(lambda: lorafit.print_trainable_parameters(tiny_llama))
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
