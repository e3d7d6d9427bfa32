"""Folding adapters into the base weights, and undoing it."""

from __future__ import annotations

from torch import nn

from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.inject import lora_layers, saved_modules
from lorafit.lora.layer import LoraLinear, ModulesToSave


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def merge_lora(model: nn.Module, keep_wrappers: bool = False) -> nn.Module:
    """Fold every LoRA update into its base weight (W += scaling * B A).

    By default the wrappers are removed and a plain transformers model comes back (the trained
    copies of `modules_to_save` take their originals' places). With `keep_wrappers=True` the layers
    stay wrapped, skip their adapter path, and keep the original weights so `unmerge_lora`
    restores them bit for bit.
    """
    for name, layer in list(lora_layers(model)):
        if isinstance(layer, LoraEmbedding):
            _untie_output_head(model, layer)
        layer.merge(keep_original=keep_wrappers)
        if not keep_wrappers:
            _replace(model, name, layer.base_layer)
    if not keep_wrappers:
        for name, wrapper in list(saved_modules(model)):
            trained = wrapper.trained
            trained.requires_grad_(False)
            _replace(model, name, trained)
        if hasattr(model, "lora_config"):
            del model.lora_config
    return model


def _untie_output_head(model: nn.Module, layer: LoraEmbedding) -> None:
    """An embedding LoRA changes the input table only; an output head sharing that table gets its own
    copy before the merge, and the config says the two are no longer tied (so a saved model keeps both)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight is not layer.base_layer.weight:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, keep_wrappers=True)`: the exact original base weights come back."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("no LoRA layers to unmerge (was the model merged without keep_wrappers=True?)")
    for _, layer in layers:
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take every wrapper out without folding anything: the base model as it was before `add_lora`."""
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        _replace(model, name, wrapper.original_module)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


__all__ = ["merge_lora", "unmerge_lora", "remove_lora", "LoraEmbedding", "LoraLinear", "ModulesToSave"]
