"""The quantized loading path (`lorafit.quant.load`, one memory map per tensor) gives exactly the
model transformers' own quantized loading gives: the same packed weights and scales, bit for bit,
the same float tensors elsewhere, the same outputs; and it keeps no map of the file open for the
tensors it quantized."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.models import load_model
from lorafit.quant import QuantizationSpec
from model_builders import build_tiny_llama, build_tiny_qwen2
from quant_specs import SPECS

pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (bitsandbytes)")
from lorafit.quant.bnb import is_quantized_linear, quantization_config  # noqa: E402
from lorafit.quant.load import checkpoint_tensors  # noqa: E402

def transformers_quantized(folder: str, spec: QuantizationSpec):
    """The previous path: transformers' own on-the-fly quantized loading, one map for the file."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config(spec),
                                                device_map={"": "cpu"}, dtype=spec.compute_dtype)


def ours(folder: str, spec: QuantizationSpec):
    return load_model(folder, quantization=spec)


def packed_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor that defines a quantized model: float parameters and buffers, packed weights,
    their block scales (and the scales' own quantization state), LLM.int8's row scales."""
    tensors = dict(model.state_dict(keep_vars=True))
    for name, module in model.named_modules():
        if not is_quantized_linear(module):
            continue
        weight = module.weight
        tensors[f"{name}.weight"] = weight.data
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors[f"{name}.absmax"] = state.absmax
            tensors[f"{name}.code"] = state.code
            if state.nested:
                tensors[f"{name}.absmax2"] = state.state2.absmax
                tensors[f"{name}.offset"] = state.offset
        if getattr(weight, "SCB", None) is not None:
            tensors[f"{name}.SCB"] = weight.SCB
    return {name: tensor.detach() for name, tensor in tensors.items()}


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Bit-for-bit comparison, whatever the dtype (float NaNs and -0.0 included)."""
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def assert_same_quantized_model(theirs, mine):
    expected, got = packed_tensors(theirs), packed_tensors(mine)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(raw_bytes(got[name]), raw_bytes(tensor)), name
    layers = [(name, module) for name, module in mine.named_modules() if is_quantized_linear(module)]
    assert layers and all(type(module) is type(theirs.get_submodule(name)) for name, module in layers)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("kind", SPECS)
def test_quantized_weights_are_bit_identical_to_transformers_loading(base_dir, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_quantized_model(transformers_quantized(base_dir, SPECS[kind]), ours(base_dir, SPECS[kind]))


def test_bf16_checkpoint_with_tied_head_and_shards(tmp_path):
    """A bf16 checkpoint (cast to the compute dtype as it loads), a tied output head, and the
    weights split into shards with an index file."""
    folder = tmp_path / "qwen2"
    build_tiny_qwen2(hidden_size=64, intermediate_size=128).to(torch.bfloat16).save_pretrained(folder)
    whole = load_file(folder / "model.safetensors")
    names = sorted(whole)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({name: whole[name] for name in shard_names}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: file for file, shard_names in shards.items() for name in shard_names}}))
    assert set(checkpoint_tensors(folder)) == set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = ours(str(folder), SPECS["nf4"])
        assert_same_quantized_model(transformers_quantized(str(folder), SPECS["nf4"]), mine)
    assert mine.lm_head.weight is mine.model.embed_tokens.weight
    assert mine.name_or_path == str(folder)


def test_only_the_float_tensors_keep_a_map_of_the_file(base_dir):
    """transformers' own path keeps one map of the whole file open for the model's life; here the
    tensors that were quantized have released theirs, and the float ones (embeddings, norms, head)
    hold one map each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ours(base_dir, SPECS["nf4"])
    floats = sum(1 for name, p in model.named_parameters() if p.dtype.is_floating_point)
    file = f"{base_dir}/model.safetensors"
    with open("/proc/self/maps") as maps:
        mapped = sum(1 for line in maps if line.rstrip().endswith(file))
    assert 0 < mapped <= floats < len(checkpoint_tensors(base_dir))


def test_a_folder_without_safetensors_loads_the_usual_way(tmp_path):
    folder = tmp_path / "bin"
    build_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert checkpoint_tensors(folder) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ours(str(folder), SPECS["nf4"])
    assert any(is_quantized_linear(module) for module in model.modules())
