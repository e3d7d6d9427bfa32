"""The model a training run starts from: base weights in their dtype, then an adapter (or none).

Dtype policy for training (the LoRA layer's own policy is in `lorafit/lora/layer.py`): with LoRA
the frozen base is stored in the compute dtype (`--bf16` -> bfloat16, `--fp16` -> float16), which
halves its memory and avoids casting every weight at every step, while the adapters stay float32
master weights. Full fine-tuning keeps float32 weights: an optimizer stepping bf16 weights loses
small updates to rounding. `--torch_dtype` overrides both.
"""

from __future__ import annotations

import logging

import torch

from lorafit.errors import UserError
from lorafit.lora import LoraConfig, add_lora, enable_gradient_checkpointing, load_adapter, share_inputs, use_fused
from lorafit.models import load_model
from lorafit.lora.inject import layer_index
from lorafit.train.args import LastLayers, LoraArguments, ModelArguments, has_accelerator, split_module_list
from lorafit.train.attention import use_training_attention
from lorafit.train.trained_token_loss import use_trained_token_loss

logger = logging.getLogger(__name__)


def base_dtype(model_args: ModelArguments, lora_args: LoraArguments, training_args) -> torch.dtype | str:
    if model_args.torch_dtype is not None:
        return model_args.torch_dtype
    if not lora_args.use_peft:
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def lora_config(lora_args: LoraArguments, layers: list[int] | None) -> LoraConfig:
    try:
        return LoraConfig(**_variant_kwargs(lora_args, layers))
    except ValueError as error:
        raise UserError(f"LoRA arguments: {error}") from None


def peft_lora_config(lora_args: LoraArguments, layers: list[int] | None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="CAUSAL_LM", **_variant_kwargs(lora_args, layers))


def selected_layers(lora_args: LoraArguments, model) -> list[int] | None:
    """`--layers_to_transform` as block indices of MODEL ('last 33%' of a 30-block model: 20-29)."""
    spec = lora_args.layers_to_transform
    if not isinstance(spec, LastLayers):
        return spec
    found = {layer_index(name, lora_args.layers_pattern) for name, _ in model.named_modules()}
    found.discard(None)
    if not found:
        raise UserError(f"--layers_to_transform {spec}: found no numbered blocks in {type(model).__name__}'s "
                        "module names (give --layers_pattern, the name of its block list)")
    blocks = max(found) + 1
    layers = spec.indices(blocks)
    logger.info("--layers_to_transform %s: blocks %d-%d of %d", spec, layers[0], layers[-1], blocks)
    return layers


def _variant_kwargs(lora_args: LoraArguments, layers: list[int] | None) -> dict:
    """The LoraConfig keyword arguments of `lorafit train`'s LoRA flags (the same names in PEFT)."""
    return dict(
        r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
        target_modules=split_module_list(lora_args.target_modules),
        exclude_modules=split_module_list(lora_args.exclude_modules),
        modules_to_save=split_module_list(lora_args.modules_to_save), use_rslora=lora_args.use_rslora,
        use_dora=lora_args.use_dora, init_lora_weights=lora_args.init_lora_weights,
        layers_to_transform=layers, layers_pattern=lora_args.layers_pattern,
    )


def attach_adapter(model, lora_args: LoraArguments):
    """Add a fresh LoRA adapter, continue `--peft_path`, or leave the model for full fine-tuning."""
    if not lora_args.use_peft:
        model.requires_grad_(True)
        return model
    if lora_args.lora_impl == "peft":
        try:
            from peft import PeftModel, get_peft_model
        except ImportError:
            raise UserError("--lora_impl peft needs the peft library: pip install peft "
                            "(or use --lora_impl native, the default)") from None
        try:
            if lora_args.peft_path:
                return PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
            return get_peft_model(model, peft_lora_config(lora_args, selected_layers(lora_args, model)))
        except ValueError as error:  # e.g. target modules that match nothing
            raise UserError(f"--lora_impl peft: {error}") from None
    if lora_args.peft_path:
        logger.info("continuing adapter %s (its own LoRA settings apply)", lora_args.peft_path)
        return load_adapter(model, lora_args.peft_path, trainable=True)
    return add_lora(model, lora_config(lora_args, selected_layers(lora_args, model)))


def build_model(model_path: str, model_args: ModelArguments, lora_args: LoraArguments, training_args):
    """Load the base model and attach what will be trained; gradient checkpointing is LoRA-aware."""
    quantization = model_args.quantization(training_args)
    if quantization is not None and not lora_args.use_peft:
        raise UserError("--quantization_bit trains adapters on a frozen quantized base; "
                        "it cannot be combined with --use_peft false (full fine-tuning)")
    device_map = None
    if quantization is not None:
        from lorafit.quant.bnb import device_map_for

        device_map = device_map_for(training_args.device)
    model = load_model(
        model_path, dtype=base_dtype(model_args, lora_args, training_args),
        attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
        quantization=quantization, device_map=device_map,
    )
    if quantization is not None:
        from lorafit.quant.bnb import prepare_for_kbit_training, quantized_layer_count

        prepare_for_kbit_training(model)
        logger.info("base quantized as it loaded: %s, %d linear layers", quantization.describe(),
                    quantized_layer_count(model))
    if training_args.activation_checkpointing:
        kwargs = dict(training_args.activation_checkpointing_kwargs or {})
        # Before the adapter goes in, so PEFT and lorafit models get the same treatment.
        enable_gradient_checkpointing(model, use_reentrant=kwargs.get("use_reentrant", True))
        # Done here once, with input embeddings requiring grad; the Trainer must not redo it
        # with different settings.
        training_args.activation_checkpointing = training_args.gradient_checkpointing = False
    if model_args.attn_implementation in (None, "sdpa"):
        use_training_attention(model)  # per-example attention for packed rows, no mask for right padding
    model = attach_adapter(model, lora_args)
    if quantization is not None and lora_args.lora_impl == "native":
        # transformers' marker for "trainable adapters are attached"; without it the Trainer
        # refuses a quantized model, since it only recognises PEFT's wrapper.
        model._hf_peft_config_loaded = True
    if model_args.trained_token_loss and lora_args.lora_impl == "native" and not training_args.use_liger_kernel:
        if not use_trained_token_loss(model):
            logger.info("%s keeps its own loss (its head is not a plain linear map)", type(model).__name__)
    trains_on_cpu = training_args.use_cpu or not has_accelerator()  # the model is still on the CPU here either way
    if (not (training_args.bf16 or training_args.fp16) and model.dtype == torch.float32 and trains_on_cpu
            and cpu_has_bf16_units()):
        logger.info("this CPU has bf16 matrix units (AMX): --bf16 true trains faster here than float32 "
                    "(docs/train.md, \"bf16 on a CPU\")")
    if training_args.deepspeed or training_args.fsdp:
        # Sharded parameters are gathered per module: a layer must not read its siblings' A, nor
        # keep a reference to its base weight past the forward pass (the fused node does).
        share_inputs(model, False)
        use_fused(model, False)
    return model


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX). Without them a bf16 step on
    a CPU is emulated, and far slower than float32; with them it is faster (docs/train.md)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check, private: may go away
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False
