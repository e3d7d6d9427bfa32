"""lorafit: instruction-tune causal language models with LoRA, readable and PEFT-compatible both ways."""

from lorafit.lora import (
    LoraConfig,
    add_lora,
    enable_gradient_checkpointing,
    load_adapter,
    merge_lora,
    print_trainable_parameters,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "add_lora", "enable_gradient_checkpointing", "load_adapter", "merge_lora",
    "print_trainable_parameters", "save_adapter", "trainable_parameters", "unmerge_lora", "__version__",
]
