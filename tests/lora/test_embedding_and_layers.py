"""LoRA on embeddings and `layers_to_transform` against real PEFT; PEFT features still missing are refused."""

import dataclasses
import json
import warnings

import peft
import pytest
import torch

import lorafit
from lorafit.errors import TargetModulesError, UserError
from lorafit.lora import LoraEmbedding, lora_layers
from lorafit.lora.adapter_io import IGNORED_KEYS, INERT_KEYS, READ_KEYS, UNSUPPORTED
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from test_adapter_io import logits, peft_model, randomize

ROUND_TRIPS = [
    (build_tiny_llama, {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    (build_tiny_qwen2, {"target_modules": ["embed_tokens", "v_proj"], "use_rslora": True}),  # tied head
    (build_tiny_gpt2, {"target_modules": ["wte", "c_attn"], "fan_in_fan_out": True}),
    (build_tiny_llama, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    (build_tiny_llama, {"target_modules": ["k_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    (build_tiny_gpt2, {"target_modules": ["c_attn"], "layers_to_transform": [1], "layers_pattern": ["h"]}),
    (build_tiny_llama, {"target_modules": ["q_proj", "embed_tokens"], "layers_to_transform": [0], "use_dora": False}),
]
IDS = ["llama-embed+lm_head", "qwen2-tied-embed", "gpt2-wte", "llama-layer-1", "llama-layer-0-pattern",
       "gpt2-h-1", "llama-embed-with-layers"]


@pytest.mark.parametrize("builder,kwargs", ROUND_TRIPS, ids=IDS)
def test_round_trip_with_peft_both_ways(tmp_path, builder, kwargs):
    ours = randomize(lorafit.add_lora(builder(), lorafit.LoraConfig(**kwargs))).eval()
    lorafit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(builder()), logits(ours), atol=1e-3)

    peft_made = randomize(peft_model(builder(), kwargs)).eval()
    peft_made.save_pretrained(tmp_path / "theirs")
    loaded = lorafit.load_adapter(builder(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded), logits(peft_made), atol=1e-5, rtol=0)
    assert sorted(n for n, _ in lora_layers(loaded)) == sorted(n for n, _ in lora_layers(ours))


def test_embedding_lora_layout_and_identity_at_start(tiny_llama):
    expected = logits(tiny_llama)
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["embed_tokens"], r=4))
    layer = tiny_llama.model.embed_tokens
    assert isinstance(layer, LoraEmbedding)
    assert layer.lora_embedding_A.shape == (4, 128) and layer.lora_embedding_B.shape == (32, 4)
    assert torch.equal(logits(tiny_llama), expected)
    assert {n for n, p in tiny_llama.named_parameters() if p.requires_grad} == {
        "model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"}


def test_embedding_merge_keeps_a_tied_head_unchanged(tiny_qwen2):
    randomize(lorafit.add_lora(tiny_qwen2, lorafit.LoraConfig(target_modules=["embed_tokens", "q_proj"]))).eval()
    expected = logits(tiny_qwen2)
    merged = lorafit.merge_lora(tiny_qwen2)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False


def test_all_linear_with_layers_to_transform_saves_a_file_peft_reads(tmp_path, tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear", layers_to_transform=[1]))
    assert {n.split(".")[2] for n, _ in lora_layers(tiny_llama)} == {"1"} and len(list(lora_layers(tiny_llama))) == 7
    randomize(tiny_llama).eval()
    lorafit.save_adapter(tiny_llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and len(config["target_modules"]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(tiny_llama), atol=1e-5, rtol=0)


def test_layer_selection_mistakes_are_named(tiny_llama):
    with pytest.raises(TargetModulesError, match=r"layers_to_transform \[5\].*layers: 0-1"):
        lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 5]))
    with pytest.raises(ValueError, match="regex"):
        lorafit.LoraConfig(target_modules=r".*q_proj", layers_to_transform=[1])
    with pytest.raises(ValueError, match="needs layers_to_transform"):
        lorafit.LoraConfig(layers_pattern="layers")


def test_a_target_that_is_neither_linear_nor_embedding_is_named(tiny_llama):
    with pytest.raises(TargetModulesError, match="model.layers.0.input_layernorm, a LlamaRMSNorm"):
        lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj", "input_layernorm"]))


def test_dora_on_an_embedding_is_refused(tiny_llama):
    with pytest.raises(UserError, match="use_dora with an embedding target"):
        lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["embed_tokens"], use_dora=True))


def test_every_peft_config_key_is_read_ignored_inert_or_refused():
    """When PEFT grows a feature, this fails until adapter_io says what to do with its key."""
    known = READ_KEYS | IGNORED_KEYS | INERT_KEYS | set(UNSUPPORTED)
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - known == set()
    assert not {"use_dora", "layers_to_transform", "layers_pattern"} & set(UNSUPPORTED)
    defaults = peft.LoraConfig().to_dict()
    for key, unused in UNSUPPORTED.items():
        assert defaults.get(key) in unused, key  # PEFT's default means "not used"


@pytest.mark.parametrize("key,value", [("lora_bias", True), ("trainable_token_indices", [1, 2]),
                                       ("layer_replication", [[0, 2]]), ("ensure_weight_tying", True),
                                       ("init_lora_weights", "loftq"), ("init_lora_weights", "corda"),
                                       ("init_lora_weights", "astra"),
                                       ("init_lora_weights", "some_future_init")])
def test_unsupported_features_are_refused_by_name(tmp_path, tiny_llama, key, value):
    lorafit.save_adapter(lorafit.add_lora(tiny_llama, lorafit.LoraConfig()), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), key: value}))
    with pytest.raises(UserError, match=key):
        lorafit.load_adapter(build_tiny_llama(), tmp_path)


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "mica", "nora"])
def test_initialisations_that_leave_the_base_alone_load_as_their_weights(tmp_path, tiny_llama, init):
    """The weights come from the file: how they were first drawn does not change the adapter's outputs."""
    model = lorafit.add_lora(tiny_llama, lorafit.LoraConfig(init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 7))
    lorafit.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "init_lora_weights": init}))
    with torch.no_grad():
        torch.testing.assert_close(lorafit.load_adapter(build_tiny_llama(), tmp_path)(ids).logits, model(ids).logits)
