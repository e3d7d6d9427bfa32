"""One adapter from several, weighted: PEFT's `add_weighted_adapter`, its "linear" and "cat" cases.

For adapters k with updates s_k B_k A_k and weights w_k:

- "cat" (exact): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], scaling 1, so
  B A = sum_k w_k s_k B_k A_k, the weighted sum of the updates; the rank is the sum of the ranks.
- "linear" (PEFT's cheap approximation, same rank as the inputs, which must all have one rank):
  A = sum_k sign(w_k s_k) sqrt(|w_k s_k|) A_k and B = sum_k sqrt(|w_k s_k|) B_k, scaling 1. The
  product also holds cross terms B_j A_k (j != k): it equals the weighted sum only when the
  adapters' subspaces do not mix. PEFT recommends "cat" or "svd" when the rank can be afforded.

A module only some adapters touch gets the weighted update of those (zero rows pad "cat" to one
rank, as in PEFT). The result is an ordinary adapter (PEFT layout, `lora_alpha` = r so the scaling
is 1, target_modules a regex of the adapted modules) that lorafit and PEFT load alike. This works
on the files alone (no model is loaded): a pure transform of configs and tensors. DoRA (a
magnitude cannot be averaged into a low-rank update), modules trained in full and PiSSA/OLoRA
adapters not converted to the original base are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lorafit.errors import UserError
from lorafit.lora.adapter_io import PREFIX, config_from_file, read_adapter_config, read_adapter_tensors
from lorafit.lora.config import LoraConfig, rewrites_base
from lorafit.lora.inject import _pattern_value

COMBINATIONS = ("linear", "cat")
# file key suffix of A -> of B (linear layers, embeddings)
PAIRS = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}


def _low_rank_pairs(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """module path -> (A suffix, A, B) for every adapted module of one adapter's tensors."""
    pairs = {}
    for key, tensor in tensors.items():
        for a_suffix, b_suffix in PAIRS.items():
            if key.startswith(PREFIX) and key.endswith(a_suffix):
                module = key[len(PREFIX): -len(a_suffix)]
                b_key = f"{PREFIX}{module}{b_suffix}"
                if b_key not in tensors:
                    raise UserError(f"{source}: {key} has no {b_key} beside it")
                pairs[module] = (a_suffix, tensor.float(), tensors[b_key].float())
    return pairs


def _checked_config(path: Path) -> LoraConfig:
    raw = read_adapter_config(path)
    config = config_from_file(raw, path)
    if config.use_dora:
        raise UserError(f"{path}: use_dora: a DoRA adapter cannot be combined with others (its magnitude is not "
                        "a low-rank update)")
    if config.modules_to_save:
        raise UserError(f"{path}: modules_to_save={config.modules_to_save}: modules trained in full cannot be "
                        "combined as low-rank updates; combine adapters without modules_to_save")
    if rewrites_base(config.init_lora_weights):
        raise UserError(f"{path}: init_lora_weights={config.init_lora_weights!r}: this adapter applies to a "
                        "PiSSA/OLoRA residual base; save it converted to the original base first")
    return config


def combine_adapters(paths: list[str | Path], weights: list[float], combination: str = "cat"
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config (a dict for adapter_config.json) and tensors of the weighted combination."""
    if combination not in COMBINATIONS:
        raise UserError(f"combination {combination!r}: choose one of {', '.join(COMBINATIONS)}")
    if len(paths) != len(weights):
        raise UserError(f"{len(paths)} adapters but {len(weights)} weights: give one weight per adapter")
    if not paths:
        raise UserError("no adapters to combine")
    paths = [Path(p) for p in paths]
    configs = [_checked_config(p) for p in paths]
    adapters = [_low_rank_pairs(read_adapter_tensors(p), p) for p in paths]
    modules = sorted(set().union(*adapters))
    if not modules:
        raise UserError("the adapters hold no LoRA tensors to combine")
    if combination == "linear":
        ranks = sorted({a.shape[0] for pairs in adapters for _, a, _ in pairs.values()})
        if len(ranks) > 1:
            raise UserError(f"the 'linear' combination needs adapters of one rank; these have ranks {ranks}: "
                            "use 'cat'")
        rank = ranks[0]
    else:
        rank = sum(max(a.shape[0] for _, a, _ in pairs.values()) for pairs in adapters)
    tensors = {}
    for module in modules:
        parts = []  # (A suffix, A, B, weight * scaling) of each adapter touching this module
        for config, pairs, weight in zip(configs, adapters, weights):
            if module in pairs:
                suffix, a, b = pairs[module]
                r = _pattern_value(module, config.rank_pattern, config.r)
                alpha = _pattern_value(module, config.alpha_pattern, config.lora_alpha)
                parts.append((suffix, a, b, weight * config.scaling_for(r, alpha)))
        a, b = _linear(parts) if combination == "linear" else _cat(parts, rank)
        suffix = parts[0][0]
        tensors[f"{PREFIX}{module}{suffix}"] = a.contiguous()
        tensors[f"{PREFIX}{module}{PAIRS[suffix]}"] = b.contiguous()
    first = read_adapter_config(paths[0])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": rank, "lora_alpha": rank, "lora_dropout": configs[0].lora_dropout,
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in modules) + ")$",
        "modules_to_save": None, "fan_in_fan_out": any(c.fan_in_fan_out for c in configs), "bias": "none",
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
    }
    return config, tensors


def _linear(parts) -> tuple[torch.Tensor, torch.Tensor]:
    a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for _, a, _, ws in parts)
    b = sum(math.sqrt(abs(ws)) * b for _, _, b, ws in parts)
    return a, b


def _cat(parts, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([ws * a for _, a, _, ws in parts])
    b = torch.cat([b for _, _, b, _ in parts], dim=1)
    missing = rank - a.shape[0]
    if missing:  # a module only some adapters touch: zero rows keep one rank for the whole adapter
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
    return a, b
