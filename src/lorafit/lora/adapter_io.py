"""Adapter files in PEFT's layout: `adapter_model.safetensors` + `adapter_config.json`.

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and
`base_model.model.<module path>.<param>` for modules trained in full (PEFT drops the
`modules_to_save.default` part of the in-memory name). The config
holds only keys PEFT has understood since 0.6, so old and new PEFT releases load our files. When
reading, keys that would change the maths if ignored (DoRA, layer selection, LoRA on embeddings...)
are refused; keys that cannot change a loaded adapter's outputs (initialisation recipes: the
weights come from the file) and unknown keys left at an empty value are ignored in silence, so the
warning about the rest fires only when it means something. A load is all or nothing: every tensor
must find its place, and every adapted module must get its tensors.

Tensors are read from safetensors first. A pickle file (`adapter_model.bin`) is read only with
`torch.load(weights_only=True)`; a payload that refuses is a one-line error naming the file.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.errors import AdapterMismatchError, UserError
from lorafit.lora.config import LoraConfig
from lorafit.lora.inject import add_lora, is_linear, lora_layers, matches, saved_modules
from lorafit.lora.layer import LoraLinear, ModulesToSave

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
# Config keys that carry meaning for us; everything else in a PEFT config is either a default
# (checked in _refuse_unsupported) or unknown (warned about).
READ_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
             "use_rslora", "init_lora_weights", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern"}
IGNORED_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision",
                "auto_mapping", "peft_version"}
# Keys recent PEFT writes that cannot change the outputs of a loaded adapter: how its weights were
# initialised (they come from the file), how PEFT places them at run time, and options of features
# that are off.
INERT_KEYS = {"loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
              "megatron_core", "qalora_group_size"}
# Features that would silently change the result if ignored: (key, value meaning "not used").
UNSUPPORTED = {"use_dora": (False, None), "layers_to_transform": (None, [],), "layers_pattern": (None, [], ""),
               "lora_bias": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None, {}),
               "use_qalora": (False, None), "alora_invocation_tokens": (None,), "megatron_config": (None,),
               "layer_replication": (None, []), "use_bdlora": (None, False, {}), "arrow_config": (None, {}),
               "kasa_config": (None, {})}
EMPTY_VALUES = (None, False, "", [], {})


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for name, wrapper in saved_modules(model):
        for param_name, tensor in wrapper.trained.state_dict().items():
            state[f"{PREFIX}{name}.{param_name}"] = tensor
    return state


def _original_linear_names(module: nn.Module, prefix: str = ""):
    """Names of the linear layers as they were before wrapping (a LoRA layer counts as its base)."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, LoraLinear) or is_linear(child):
            yield name
        elif not isinstance(child, ModulesToSave):
            yield from _original_linear_names(child, name + ".")


def _target_modules_for_file(model: nn.Module) -> list[str] | str:
    """The adapted modules as PEFT will re-select them: leaf names when those select exactly this
    set in this model (the common, readable case), otherwise a regex of the full names."""
    adapted = sorted(name for name, _ in lora_layers(model))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if sorted(n for n in _original_linear_names(model) if matches(n, leaves)) == adapted:
        return leaves
    return "^(?:" + "|".join(re.escape(name) for name in adapted) + ")$"


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of `model` (LoRA tensors and modules_to_save) to folder `path`."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA adapter (call add_lora or load_adapter first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    layers = dict(lora_layers(model))
    file_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules_for_file(model) if layers else None,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "inference_mode": True,
    }
    if config.rank_pattern:
        file_config["rank_pattern"] = config.rank_pattern
    if config.alpha_pattern:
        file_config["alpha_pattern"] = config.alpha_pattern
    (path / CONFIG_NAME).write_text(json.dumps(file_config, indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{path} is not an adapter folder: {CONFIG_NAME} not found")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_file}: peft_type is {raw['peft_type']!r}; lorafit loads LoRA adapters only")
    return raw


def _refuse_unsupported(raw: dict, source: Path) -> None:
    for key, unused in UNSUPPORTED.items():
        if key in raw and raw[key] not in unused:
            raise UserError(f"{source}: {key}={raw[key]!r} is not supported by lorafit "
                            "(loading it without that feature would give different outputs)")


def _is_empty(value) -> bool:
    """None, False, "", [] or {}: how PEFT writes a feature that is off (0 is a value, not 'off')."""
    return any(value == empty and type(value) is type(empty) for empty in EMPTY_VALUES)


def config_from_file(raw: dict, source: Path) -> LoraConfig:
    _refuse_unsupported(raw, source)
    unknown = sorted(key for key in set(raw) - READ_KEYS - IGNORED_KEYS - INERT_KEYS - set(UNSUPPORTED)
                     if not _is_empty(raw[key]))
    if unknown:  # a key switched on that lorafit does not know: it may change the outputs
        logger.warning("%s: ignoring adapter config keys lorafit does not know, set to: %s", source,
                       ", ".join(f"{key}={raw[key]!r}" for key in unknown))
    kwargs = {k: raw[k] for k in READ_KEYS if k in raw and raw[k] is not None}
    kwargs["init_lora_weights"] = True  # weights come from the file; the init method is irrelevant
    try:
        return LoraConfig(**kwargs)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors when present, else the pickle file read with weights_only."""
    safetensors_file, pickle_file = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if safetensors_file.is_file():
        try:
            return load_file(str(safetensors_file))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{safetensors_file}: not a readable safetensors file ({_first_line(error)}); "
                            "the save was probably cut short: save the adapter again") from None
    if pickle_file.is_file():
        return _load_pickle_tensors(pickle_file)
    raise UserError(f"{path}: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in the adapter folder")


def _load_pickle_tensors(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True unpickles tensors and plain containers only, so a payload that would run code
    # is refused, with a long message about torch internals; the user needs what to do instead.
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{file}: refused: the pickle file holds more than tensors (it could run code when "
                        f"loaded); use an adapter saved as {WEIGHTS_NAME}, or, if you trust its source, "
                        f"convert it to {WEIGHTS_NAME}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{file}: not a readable PyTorch file ({_first_line(error)})") from None
    if not isinstance(tensors, dict) or not all(torch.is_tensor(value) for value in tensors.values()):
        raise UserError(f"{file}: expected a mapping of names to tensors, got {type(tensors).__name__}")
    return tensors


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _describe(model: nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return f"{name} ({type(model).__name__})"


def load_adapter(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject the adapter stored in folder `path` (lorafit or PEFT) into `model` and load its weights."""
    path = Path(path)
    raw = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    if any("lora_embedding_" in key or "lora_magnitude_vector" in key for key in tensors):
        raise UserError(f"{path}: LoRA on embeddings or DoRA tensors are not supported by lorafit")
    config = config_from_file(raw, path)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    add_lora(model, config)
    expected = adapter_state_dict(model)
    problems = _compare(expected, tensors)
    if problems:  # all or nothing: the model goes back to the way it came in
        from lorafit.lora.merge import remove_lora

        remove_lora(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable_before.get(name, parameter.requires_grad))
        raise AdapterMismatchError(
            f"adapter {path} does not fit base model {_describe(model)}:\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    for param in _adapter_parameters(model):
        param.requires_grad_(trainable)
    return model


def _compare(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 10) -> list[str]:
    def listing(keys):
        keys = sorted(keys)
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    problems = []
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        problems.append(f"missing in the adapter ({len(missing)}): {listing(missing)}")
    if unexpected:
        problems.append(f"not in the base model ({len(unexpected)}): {listing(unexpected)}")
    shapes = [f"{k}: adapter {tuple(found[k].shape)} vs base {tuple(v.shape)}"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    if shapes:
        problems.append(f"shapes that do not fit ({len(shapes)}): " + "; ".join(shapes[:limit]))
    return problems


def _adapter_parameters(model: nn.Module):
    for _, layer in lora_layers(model):
        yield from (layer.lora_A.weight, layer.lora_B.weight)
    for _, wrapper in saved_modules(model):
        yield from wrapper.trained.parameters()
