"""`lorafit export --format gguf`: the merged model, read back by gguf and by transformers' GGUF loader.

transformers dequantises a llama.cpp GGUF into its own model (undoing llama.cpp's q/k row order with its
own code), so equal logits mean the names, shapes, hyper-parameters and the row order are all right.
"""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorafit
from export_helpers import export, make_adapter, metadata, tensors, undo_llama_cpp_rope_order
from lorafit.data.templates import CHATML_TEMPLATE, set_chat_template
from lorafit.models import load_model

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 1 to 5, then say 42!"}],
    [{"role": "user", "content": "Écris une phrase en français avec des émojis 🚀."}],
]
# Logit error of the GGUF model against lorafit's base + adapter, ||gguf - ref|| / ||ref||, per --outtype:
# f32 is rounding only; f16/bf16 round every weight to an 11/8-bit significand (lorafit merge's bounds);
# q8_0 rounds every weight to 1/127 of its block's largest value.
RELATIVE_TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2}
# Top-1 agreement with lorafit's float32 model over every probe position, at least. A random tiny model
# has many near-ties in its logits, so rounding flips some (measured here: f16 0.99-1.0, bf16 0.97,
# q8_0 0.95-1.0; errors f16 1e-3, bf16 2e-2, q8_0 3e-2). bench/bench_gguf_llamacpp.py measures a real model.
TOP1_AGREEMENT = {"f32": 1.0, "f16": 0.95, "bf16": 0.85, "q8_0": 0.85}


@pytest.fixture(scope="module")
def adapters(tiny_bases, tiny_tokenizer, tmp_path_factory):
    """One random adapter per base; the Llama one was trained with lorafit's ChatML template (no default system)."""
    folders = {arch: (base, make_adapter(base, tmp_path_factory.mktemp(f"adapter-{arch}"), tiny_tokenizer))
               for arch, base in tiny_bases.items()}
    chatml_tokenizer = copy.deepcopy(tiny_tokenizer)
    set_chat_template(chatml_tokenizer, "chatml").save_pretrained(folders["llama"][1])
    return folders


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)]) for c in CONVERSATIONS]


@torch.inference_mode()
def all_logits(model, prompts) -> torch.Tensor:
    return torch.cat([model(ids).logits[0].float() for ids in prompts])


@pytest.mark.parametrize("arch,outtype", [("llama", "f32"), ("qwen2", "f32"), ("mistral", "f32"),
                                          ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("qwen2", "q8_0")])
def test_merged_gguf_gives_lorafits_logits_in_transformers(adapters, arch, outtype, tmp_path):
    base, adapter = adapters[arch]
    output = tmp_path / "model.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", outtype, "--output", output) == 0

    prompts = prompt_ids(AutoTokenizer.from_pretrained(adapter))
    reference = all_logits(lorafit.load_adapter(load_model(base), adapter).eval(), prompts)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=output.name, dtype=torch.float32).eval()
    logits = all_logits(loaded, prompts)
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error <= RELATIVE_TOLERANCE[outtype], f"relative logit error {error:.2e}"
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"{arch} {outtype}: relative logit error {error:.2e}, top-1 agreement {agreement:.3f}")
    assert agreement >= TOP1_AGREEMENT[outtype], f"top-1 agreement {agreement:.3f}"


def test_merged_file_metadata_names_shapes_and_tokenizer(adapters, tmp_path):
    base, adapter = adapters["llama"]
    output = tmp_path / "model.gguf"
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f16", "--output", output) == 0
    reader = gguf.GGUFReader(output)
    meta = metadata(reader)
    config = load_model(base).config
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert (meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.embedding_length"], meta["llama.context_length"], meta["llama.vocab_size"]) == (
            2, 4, 2, 32, 512, config.vocab_size)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == config.vocab_size and meta["tokenizer.ggml.merges"]
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE  # the adapter's training template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.eos_token_id"] == im_end and meta["tokenizer.ggml.eot_token_id"] == im_end

    found = tensors(reader)
    assert "output.weight" in found and "token_embd.weight" in found  # an untied head is its own tensor
    for name, (ne, qtype, _) in found.items():
        expected = gguf.GGMLQuantizationType.F32 if len(ne) == 1 else gguf.GGMLQuantizationType.F16
        assert qtype == expected, name
    assert found["blk.1.attn_k.weight"][0] == [32, 16] and found["blk.1.ffn_down.weight"][0] == [64, 32]

    # transformers reads the same vocabulary and special tokens back from the file
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=output.name)
    for text in ["Hello world!", "  spaces\tand\nnewlines 12345", "<|im_start|>user\nHi<|im_end|>", "🚀 émojis"]:
        assert from_gguf.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_llama_q_and_k_rows_are_in_llama_cpps_order_qwen2_rows_are_not(adapters, tmp_path):
    for arch in ("llama", "qwen2"):
        base, adapter = adapters[arch]
        output = tmp_path / f"{arch}.gguf"
        assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", output) == 0
        merged = lorafit.merge_lora(lorafit.load_adapter(load_model(base), adapter))
        attention = merged.model.layers[0].self_attn
        found = tensors(gguf.GGUFReader(output))
        stored_q = torch.from_numpy(found["blk.0.attn_q.weight"][2].copy())
        stored_k = torch.from_numpy(found["blk.0.attn_k.weight"][2].copy())
        if arch == "llama":
            assert not torch.allclose(stored_q, attention.q_proj.weight)
            torch.testing.assert_close(undo_llama_cpp_rope_order(stored_q, 4), attention.q_proj.weight)
            torch.testing.assert_close(undo_llama_cpp_rope_order(stored_k, 2), attention.k_proj.weight)
        else:
            torch.testing.assert_close(stored_q, attention.q_proj.weight)
            torch.testing.assert_close(torch.from_numpy(found["blk.0.attn_q.bias"][2].copy()), attention.q_proj.bias)
            assert "output.weight" not in found  # tied: llama.cpp reads token_embd


def test_llama3_rope_divisors_match_transformers(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lorafit.export.gguf_model import llama3_rope_divisors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope)
    default = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert default.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(torch.from_numpy(llama3_rope_divisors(config)).double(), plain / scaled.double(),
                               rtol=1e-5, atol=0)


def test_the_embedded_tokenizer_is_llama_cpps_smollm_pre_tokenizer(smol_tokenizer):
    from lorafit.export.gguf_tokenizer import check_tokenizer

    assert check_tokenizer(smol_tokenizer) == "smollm"
