"""FSDP / ZeRO-3 saving picks the adapter out of a gathered state dict under the file's names."""

import torch

import lorafit
from lorafit.lora.adapter_io import adapter_state_dict
from lorafit.train.trainer import adapter_tensors_from_state_dict


def test_gathered_state_dict_gives_the_same_adapter_keys_and_values(tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    expected = adapter_state_dict(tiny_llama)
    picked = adapter_tensors_from_state_dict(tiny_llama.state_dict())
    assert picked.keys() == expected.keys()
    assert all(torch.equal(picked[k], expected[k]) for k in expected)
