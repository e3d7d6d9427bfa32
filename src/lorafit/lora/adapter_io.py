"""Adapter files in PEFT's layout: `adapter_model.safetensors` + `adapter_config.json`.

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (plus
`.lora_magnitude_vector` with DoRA; `.lora_embedding_A` / `.lora_embedding_B` on embeddings), and
`base_model.model.<module path>.<param>` for modules trained in full (PEFT drops the
`modules_to_save.default` part of the in-memory name). The config holds only keys PEFT has
understood since 0.6, plus `use_dora` and `layers_to_transform` / `layers_pattern` when those are on
(PEFT reads them since 0.9 and 0.3). A PiSSA/OLoRA adapter is written for the original base
(`lora/init.py`). When reading, PEFT features lorafit lacks, which would change the maths if ignored,
are refused by name (UNSUPPORTED); keys that cannot change a loaded adapter's outputs (initialisation
recipes whose weights come from the file) and unknown keys left at an empty value are ignored in
silence, so the warning about the rest fires only when it means something. An adapter saved by PEFT
with `init_lora_weights` "pissa..." or "olora" applies to a residual base: lorafit recomputes that
residual, as PEFT does. A load is all or nothing: every tensor must find its place, and every
adapted module must get its tensors.

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
from lorafit.lora.config import LoraConfig, rewrites_base, valid_init
from lorafit.lora.init import file_config_for_original_base, from_original_base, to_original_base
from lorafit.lora.inject import LORA_LAYERS, add_lora, is_embedding, is_linear, layer_index, lora_layers, saved_modules
from lorafit.lora.layer import ModulesToSave

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
# Config keys that carry meaning for us; everything else in a PEFT config is either a default
# (checked in _refuse_unsupported) or unknown (warned about).
READ_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
             "use_rslora", "init_lora_weights", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern",
             "use_dora", "layers_to_transform", "layers_pattern"}
IGNORED_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision",
                "auto_mapping", "peft_version"}
# Keys recent PEFT writes that cannot change the outputs of a loaded adapter: how its weights were
# initialised (they come from the file), how PEFT places them at run time, and options of features
# that are off.
INERT_KEYS = {"loftq_config", "eva_config", "corda_config", "lora_ga_config", "astra_config", "runtime_config",
              "megatron_core", "qalora_group_size"}
# PEFT features lorafit lacks, which would silently change the result if ignored:
# (key, values meaning "not used"); checked against the installed PEFT's LoraConfig fields by a test
# (written against 0.21; 0.22 added astra_config, an option of the astra initialisation refused below).
UNSUPPORTED = {"lora_bias": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None, {}),
               "use_qalora": (False, None), "alora_invocation_tokens": (None,), "megatron_config": (None,),
               "layer_replication": (None, []), "use_bdlora": (None, False, {}), "arrow_config": (None, {}),
               "kasa_config": (None, {}), "velora_config": (None, {}), "monteclora_config": (None, {}),
               "ensure_weight_tying": (False, None)}
# init_lora_weights values of adapters whose outputs do not depend on the initialisation (the weights
# come from the file), and those that rewrite the base weight in a way lorafit cannot redo.
INERT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "nora")
UNSUPPORTED_INITS = ("loftq", "corda", "lora_ga", "astra")  # astra (PEFT 0.22): like corda, a residual base
EMPTY_VALUES = (None, False, "", [], {})


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter tensors under their file keys (a PiSSA/OLoRA model's as trained, not converted)."""
    state = {}
    for name, layer in lora_layers(model):
        for suffix, tensor in layer.adapter_tensors().items():
            state[f"{PREFIX}{name}.{suffix}"] = tensor
    for name, wrapper in saved_modules(model):
        for param_name, tensor in wrapper.trained.state_dict().items():
            state[f"{PREFIX}{name}.{param_name}"] = tensor
    return state


def _original_linear_names(module: nn.Module, prefix: str = ""):
    """Names of the linear layers as they were before wrapping (a LoRA layer counts as its base)."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, LORA_LAYERS) or is_linear(child) or is_embedding(child):
            yield name
        elif not isinstance(child, ModulesToSave):
            yield from _original_linear_names(child, name + ".")


def _peft_selects(names: list[str], leaves: list[str], layers, layers_pattern) -> list[str]:
    """The names PEFT's rule picks from `names` for a list of leaf names and optional layer indices."""
    picked = []
    for name in names:
        if name in leaves:
            picked.append(name)
        elif any(name.endswith("." + leaf) for leaf in leaves):
            index = layer_index(name, layers_pattern) if layers is not None else None
            if layers is None or (index is not None and (index == layers if isinstance(layers, int) else index in layers)):
                picked.append(name)
    return sorted(picked)


def _target_modules_for_file(model: nn.Module, config: LoraConfig) -> dict:
    """`target_modules` (and the layer selection) as PEFT will re-select the adapted modules: leaf
    names, with `layers_to_transform` when the run selected layers, if those pick exactly this set in
    this model (the common, readable case); otherwise a regex of the full names."""
    adapted = sorted(name for name, _ in lora_layers(model))
    if not adapted:
        return {"target_modules": None}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    names = list(_original_linear_names(model))
    if config.selects_layers:
        if _peft_selects(names, leaves, config.layers_to_transform, config.layers_pattern) == adapted:
            return {"target_modules": leaves, "layers_to_transform": config.layers_to_transform,
                    "layers_pattern": config.layers_pattern}
    elif _peft_selects(names, leaves, None, None) == adapted:
        return {"target_modules": leaves}
    return {"target_modules": "^(?:" + "|".join(re.escape(name) for name in adapted) + ")$"}


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of `model` (LoRA tensors and modules_to_save) to folder `path`.

    A PiSSA/OLoRA adapter is written for the original base model (rank 2r, `lora/init.py`)."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA adapter (call add_lora or load_adapter first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = dict(lora_layers(model))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    rewritten = any(getattr(layer, "initial_A", None) is not None for layer in layers.values())
    if rewritten:
        tensors = to_original_base(tensors, layers, PREFIX)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    file_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        **_target_modules_for_file(model, config),
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "inference_mode": True,
    }
    if config.use_dora:
        file_config["use_dora"] = True
    if config.rank_pattern:
        file_config["rank_pattern"] = config.rank_pattern
    if config.alpha_pattern:
        file_config["alpha_pattern"] = config.alpha_pattern
    if rewritten:  # written for the original base: rank 2r, same scaling, a plain LoRA initialisation
        file_config = file_config_for_original_base(file_config, config.use_rslora)
    elif rewrites_base(config.init_lora_weights):  # nothing was rewritten (embeddings only)
        file_config["init_lora_weights"] = True
    return write_adapter(path, file_config, tensors)


def write_adapter(path: str | Path, file_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """The two files of an adapter folder, from a config dict and tensors under their file keys."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_NAME),
              metadata={"format": "pt"})
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


def _init_for_loading(init, source: Path):
    """PiSSA/OLoRA adapters apply to a residual base: the layers redo that split (as PEFT's loader
    does); every other initialisation is irrelevant once the weights come from the file."""
    if isinstance(init, str) and rewrites_base(init) and valid_init(init):
        return init
    if init in INERT_INITS:
        return True
    why = "it rewrites the base weight in a way lorafit does not reproduce" if init in UNSUPPORTED_INITS else \
        "an initialisation lorafit does not know"
    raise UserError(f"{source}: init_lora_weights={init!r} is not supported by lorafit ({why}; loading the "
                    "adapter without it would give different outputs)")


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
    kwargs["init_lora_weights"] = _init_for_loading(raw.get("init_lora_weights", True), source)
    if kwargs.get("layers_to_transform") == []:
        kwargs["layers_to_transform"] = None
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
    config = config_from_file(raw, path)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        add_lora(model, config)
    except UserError as error:
        raise UserError(f"adapter {path}: {error}") from None
    expected = adapter_state_dict(model)
    # PEFT also saves the table of an adapted embedding (for vocabularies resized before training).
    base_tables = {f"{PREFIX}{name}.base_layer.weight": layer.base_layer.weight
                   for name, layer in lora_layers(model) if is_embedding(layer.base_layer)}
    problems = _compare({**expected, **{k: v for k, v in base_tables.items() if k in tensors}}, tensors)
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
            target = expected.get(key, base_tables.get(key))
            target.copy_(tensor.to(target.dtype))
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


def read_tensors_for(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors in the live form of `model` (a PiSSA/OLoRA model's trained halves)."""
    path = Path(path)
    return from_original_base(read_adapter_tensors(path), dict(lora_layers(model)), PREFIX, str(path))


def _adapter_parameters(model: nn.Module):
    for _, layer in lora_layers(model):
        yield from layer.adapter_tensors().values()
    for _, wrapper in saved_modules(model):
        yield from wrapper.trained.parameters()
