"""Finding the target modules of a model and wrapping them in place."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from lorafit.errors import TargetModulesError
from lorafit.lora.config import ALL_LINEAR, LoraConfig
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layer import LoraLinear, ModulesToSave
from lorafit.lora.shared_input import share_inputs

LORA_LAYERS = (LoraLinear, LoraEmbedding)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list matches the name or a `.suffix`."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module)]


def layer_index(name: str, layers_pattern) -> int | None:
    """The block index in a module name, by PEFT's rule: the first `<pattern>.<digits>.` (any pattern
    when none is given), so an expert index deeper in the name is not mistaken for the layer's."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if found:
                break
    return int(found.group("idx")) if found else None


def _in_selected_layers(name: str, config: LoraConfig) -> bool:
    wanted = config.layers_to_transform
    index = layer_index(name, config.layers_pattern)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _target_chosen(name: str, module: nn.Module, config: LoraConfig, heads: set[str]) -> bool:
    """PEFT's selection: a regex over the full name, or a list of names and `.suffix`es; an exact
    name in the list is taken whatever its layer, a suffix match only in `layers_to_transform`."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        chosen = is_linear(module) and name not in heads
        return chosen and (not config.selects_layers or _in_selected_layers(name, config))
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    chosen = any(name.endswith("." + target) for target in targets)
    return chosen and (not config.selects_layers or _in_selected_layers(name, config))


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the linear and embedding modules `config` selects; an error listing candidates
    when none, naming a selected module of another kind, or naming layers that do not exist."""
    targets = config.target_modules
    heads = _output_head_names(model)
    saved = config.modules_to_save or []
    selected = []
    for name, module in model.named_modules():
        if not name or (saved and matches(name, saved)) or isinstance(module, LORA_LAYERS + (ModulesToSave,)):
            continue
        if not _target_chosen(name, module, config, heads):
            continue
        if config.exclude_modules and matches(name, config.exclude_modules):
            continue
        if not (is_linear(module) or is_embedding(module)):
            raise TargetModulesError(
                f"target_modules={targets!r} selects {name}, a {type(module).__name__}: LoRA adapts linear "
                "layers (nn.Linear, Conv1D) and nn.Embedding only; name those modules instead"
            )
        selected.append(name)
    if targets and not selected:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        layers = f" in layers {config.layers_to_transform}" if config.selects_layers else ""
        raise TargetModulesError(
            f"target_modules={targets!r} matched no linear module of {type(model).__name__}{layers}. "
            f"Its linear modules are named: {', '.join(names)} (or use 'all-linear')"
        )
    if config.selects_layers:
        _check_layers_exist(model, config)
    return selected


def _check_layers_exist(model: nn.Module, config: LoraConfig) -> None:
    wanted = config.layers_to_transform
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    present = {layer_index(name, config.layers_pattern) for name, _ in model.named_modules()} - {None}
    missing = sorted(wanted - present)
    if missing:
        span = f"{min(present)}-{max(present)}" if present else "none found"
        pattern = f" under {config.layers_pattern!r}" if config.layers_pattern else ""
        raise TargetModulesError(f"layers_to_transform {missing}: {type(model).__name__} has no such "
                                 f"layer{pattern} (its layers: {span})")


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the target modules of `model` in place, freeze everything else, and return `model`."""
    if any(isinstance(m, LORA_LAYERS) for m in model.modules()):
        raise ValueError("this model already has LoRA layers; merge_lora() them or start from a fresh base")
    targets = find_target_modules(model, config)
    embeddings = [name for name in targets if is_embedding(model.get_submodule(name))]
    if config.use_dora and embeddings:
        raise TargetModulesError(f"use_dora with an embedding target ({', '.join(embeddings)}) is not supported by "
                                 "lorafit: drop the embedding from target_modules, or DoRA")
    model.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        r = _pattern_value(name, config.rank_pattern, config.r)
        alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha)
        if is_embedding(base):
            layer = LoraEmbedding(base, r=r, lora_alpha=alpha, scaling=config.scaling_for(r, alpha),
                                  init_lora_weights=config.init_lora_weights, adapter_dtype=adapter_dtype)
        else:
            layer = LoraLinear(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                               scaling=config.scaling_for(r, alpha), init_lora_weights=config.init_lora_weights,
                               adapter_dtype=adapter_dtype, use_dora=config.use_dora)
        layer.train(base.training)  # a model in eval mode stays in eval mode (no dropout)
        _set_submodule(model, name, layer)
    saved = find_modules_to_save(model, config.modules_to_save)
    for name in saved:
        _set_submodule(model, name, ModulesToSave(model.get_submodule(name)))
    share_inputs(model)  # an execution detail: files and parameters stay per layer
    model.lora_config = config
    return model


def find_modules_to_save(model: nn.Module, patterns: list[str] | None) -> list[str]:
    if not patterns:
        return []
    names = [name for name, _ in model.named_modules() if name and matches(name, patterns)]
    # Keep the outermost match only (a pattern matching a block should not also wrap its children).
    names = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    missing = [p for p in patterns if not any(matches(n, [p]) for n in names)]
    if missing:
        raise TargetModulesError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraEmbedding]]:
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once (as PEFT counts)."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = True) -> nn.Module:
    """Recompute activations in the backward pass, with LoRA still receiving gradients.

    With reentrant checkpointing a block whose inputs need no grad produces outputs that need none
    either, and the frozen base would cut the graph before any LoRA layer: making the input
    embeddings require grad keeps it connected. The KV cache is useless while training and
    conflicts with recomputation, so it is switched off.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model
