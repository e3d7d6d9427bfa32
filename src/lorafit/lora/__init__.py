"""The LoRA core, written from scratch: config, layer, injection, PEFT-layout files, merging."""

from lorafit.lora.adapter_io import load_adapter, read_adapter_config, save_adapter
from lorafit.lora.config import LoraConfig
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.fused import use_fused
from lorafit.lora.inject import (
    add_lora,
    enable_gradient_checkpointing,
    find_target_modules,
    lora_layers,
    print_trainable_parameters,
    trainable_parameters,
)
from lorafit.lora.layer import LoraLinear, ModulesToSave
from lorafit.lora.merge import merge_lora, unmerge_lora
from lorafit.lora.shared_input import share_inputs

__all__ = [
    "LoraConfig", "LoraEmbedding", "LoraLinear", "ModulesToSave", "add_lora", "enable_gradient_checkpointing",
    "find_target_modules", "load_adapter", "lora_layers", "merge_lora", "print_trainable_parameters",
    "read_adapter_config", "save_adapter", "share_inputs", "trainable_parameters", "unmerge_lora",
    "use_fused",
]
