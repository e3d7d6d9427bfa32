"""An adapter as a GGUF LoRA file: what `llama-cli --lora FILE` and Ollama's `ADAPTER FILE` load.

For each adapted linear layer with weight W (out x in), llama.cpp computes

    y = W x + (alpha / r) * B (A x)

from two tensors named after the base tensor: `blk.N.attn_q.weight.lora_a` holding A (r x in, so
GGML's ne = [in, r]) and `.lora_b` holding B (out x r, ne = [r, out]), with `r` read from the
tensors and `alpha` from the file's `adapter.lora.alpha`. That is PEFT's layout, so A and B are
written as they are, with two exceptions:

* B's rows follow the base tensor's row order in llama.cpp, so for a Llama's q_proj and k_proj
  they are reordered exactly as the weights are (`architectures.reorder_rope_rows`);
* llama.cpp has one alpha per file and always divides by the rank, while a module's scale in lorafit
  can differ (rsLoRA's alpha / sqrt(r), `rank_pattern`, `alpha_pattern`): any such module gets the
  ratio folded into its B, so llama.cpp's alpha / r times B is the scale lorafit applies.

llama.cpp applies LoRA to linear layers only, on the base weights it loaded: modules trained in full
(`modules_to_save`), DoRA's magnitudes, LoRA on embeddings and adapters that rewrite the base
(PiSSA/OLoRA saved by PEFT against a residual base) cannot be expressed; each is an error that
suggests the merged export, which holds any adapter.

The base model is only read for its config: the adapter is checked against a model built on the
meta device (no weights), so exporting an adapter of a large model costs nothing but the adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

from lorafit.errors import AdapterMismatchError, UserError
from lorafit.export.architectures import TensorNames, architecture_of, to_llama_cpp_rows
from lorafit.export.gguf_file import PlannedFile

LORA_KEY_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MERGED_HINT = "export the merged model instead: --format gguf"


class NotForLlamaCpp(UserError):
    """The adapter uses something llama.cpp cannot apply as a LoRA."""


def refuse_what_llama_cpp_cannot_apply(adapter: Path, raw_config: dict, keys: list[str]) -> None:
    """Errors, from the adapter's own files, for the features a GGUF LoRA cannot carry."""
    saved = raw_config.get("modules_to_save") or []
    if saved:
        raise NotForLlamaCpp(f"{adapter}: modules_to_save={saved!r} are trained in full, which a llama.cpp LoRA "
                             f"cannot carry; {MERGED_HINT}")
    if raw_config.get("use_dora"):
        raise NotForLlamaCpp(f"{adapter}: DoRA (use_dora) has magnitude vectors llama.cpp does not apply; {MERGED_HINT}")
    init = raw_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora")):
        raise NotForLlamaCpp(f"{adapter}: init_lora_weights={init!r}: this adapter applies to a rewritten base, "
                             f"not the base llama.cpp loads; {MERGED_HINT}")
    others = sorted(key for key in keys if not key.endswith(LORA_KEY_SUFFIXES))
    if others:
        kind = ("LoRA on embeddings" if any("lora_embedding" in key for key in others)
                else "DoRA magnitudes" if any("magnitude" in key for key in others) else "tensors other than LoRA A/B")
        raise NotForLlamaCpp(f"{adapter}: {kind} ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}) "
                             f"cannot go into a llama.cpp LoRA; {MERGED_HINT}")


def load_on_meta_base(adapter: Path, config):
    """The adapter loaded into a weightless copy of the base: checks that it fits (names, shapes)."""
    from transformers import AutoModelForCausalLM

    from lorafit.lora import load_adapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        return load_adapter(model, adapter)
    except AdapterMismatchError as error:
        raise AdapterMismatchError(f"{error}\n(is --model_name_or_path the model this adapter was trained on?)") from None


def plan_lora(adapter: Path, config, wanted: gguf.GGMLQuantizationType, log=print) -> PlannedFile:
    """The GGUF LoRA file for `adapter` on a base with `config`: its tensors and metadata."""
    from lorafit.lora import lora_layers, read_adapter_config
    from lorafit.lora.adapter_io import read_adapter_tensors
    from lorafit.lora.layer import LoraLinear

    architecture = architecture_of(config)
    raw = read_adapter_config(adapter)
    refuse_what_llama_cpp_cannot_apply(adapter, raw, list(read_adapter_tensors(adapter)))
    alpha = float(raw.get("lora_alpha") or 0)
    if not alpha > 0:
        raise UserError(f"{adapter}/adapter_config.json: lora_alpha must be a positive number, got {raw.get('lora_alpha')!r}")
    model = load_on_meta_base(adapter, config)
    names = TensorNames(architecture, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = PlannedFile(architecture.gguf_name, lambda writer: describe_lora(writer, adapter, alpha),
                       expected_metadata={
                           gguf.Keys.General.ARCHITECTURE: architecture.gguf_name,
                           gguf.Keys.General.TYPE: gguf.GGUFType.ADAPTER,
                           gguf.Keys.Adapter.TYPE: "lora",
                           gguf.Keys.Adapter.LORA_ALPHA: float(np.float32(alpha)),
                       })
    rescaled = []
    for module_name, layer in lora_layers(model):
        if not isinstance(layer, LoraLinear):
            raise NotForLlamaCpp(f"{adapter}: {module_name} is a {type(layer).__name__}, which llama.cpp cannot "
                                 f"apply as a LoRA; {MERGED_HINT}")
        kind, gguf_name = names.require(f"{module_name}.weight", "adapted module")
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            raise NotForLlamaCpp(f"{adapter}: LoRA on {module_name}, but this base ties it to the embeddings, which "
                                 f"llama.cpp then has no separate output tensor for; {MERGED_HINT}")
        lora_a = layer.lora_A.weight.detach().float()
        lora_b = layer.lora_B.weight.detach().float()
        llama_cpp_scale = alpha / layer.r
        if not math.isclose(layer.scaling, llama_cpp_scale, rel_tol=1e-6):
            lora_b = lora_b * (layer.scaling / llama_cpp_scale)
            rescaled.append(module_name)
        lora_b = to_llama_cpp_rows(kind, lora_b, architecture, config)
        plan.add(f"{gguf_name}.lora_a", lora_a.numpy(), wanted)
        plan.add(f"{gguf_name}.lora_b", lora_b.numpy(), wanted)
    if not plan.tensors:
        raise UserError(f"{adapter}: the adapter has no LoRA layers to export")
    if rescaled:
        log(f"{len(rescaled)} module(s) scale differently from alpha / r (rsLoRA or rank/alpha patterns): "
            "the ratio is folded into their B")
    return plan


def describe_lora(writer: gguf.GGUFWriter, adapter: Path, alpha: float) -> None:
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter.resolve().name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def check_fits_base_gguf(plan: PlannedFile, base_gguf: Path) -> None:
    """llama.cpp's own checks, ahead of time: same architecture, and each adapted tensor in the base GGUF
    with ne = [in, out] where A has ne = [in, r] and B has ne = [r, out]."""
    try:
        reader = gguf.GGUFReader(base_gguf)
    except (OSError, ValueError) as error:
        raise UserError(f"{base_gguf}: not a readable GGUF file ({error})") from None
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    architecture = field.contents() if field is not None else None
    if architecture != plan.architecture:
        raise AdapterMismatchError(f"{base_gguf} is a {architecture} model; the adapter is for a {plan.architecture} model")
    shapes = {tensor.name: [int(n) for n in tensor.shape] for tensor in reader.tensors}
    problems = []
    for name, lora_a in plan.tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base_name, lora_b = name.removesuffix(".lora_a"), plan.tensors[name.removesuffix("_a") + "_b"]
        wanted = [lora_a.shape[1], lora_b.shape[0]]
        if shapes.get(base_name) != wanted:
            problems.append(f"{base_name}: base {shapes.get(base_name, 'missing')}, adapter needs {wanted}")
    if problems:
        raise AdapterMismatchError(f"the adapter does not fit {base_gguf} (GGML shapes):\n  " + "\n  ".join(problems[:10]))
