"""Fixtures for the evaluate tests: two different random adapters over the tiny test model."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.models import load_model


def random_adapter(base_dir: str, folder, seed: int, target_modules) -> str:
    model = load_model(base_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # B = 0 at init would make the adapter a no-op
    lorafit.save_adapter(model, folder, base_model_name_or_path=base_dir)
    return str(folder)


@pytest.fixture(scope="session")
def two_adapters(tiny_model_dir, tmp_path_factory):
    first = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter_a") / "a", 1, "all-linear")
    second = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter_b") / "b", 2, ["q_proj", "v_proj"])
    return first, second
