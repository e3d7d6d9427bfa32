"""PiSSA and OLoRA: A and B start from the base weight's main directions, the base keeps the rest.

Plain LoRA starts from B = 0, so the first steps train a random A into a zero update. PiSSA
(Meng et al., 2024, "Principal Singular values and Singular vectors Adaptation") and OLoRA
(Büyükakyüz, 2024, "Orthonormal Low-Rank Adaptation") instead move a rank-r part of W into the
adapter and leave the residual in the base, so that at step 0 the model is unchanged:

    W = W_res + s B0 A0,     W_res = W - s B0 A0   (stored in place of W)

* PiSSA: the top-r singular triplets of W = U S V^T: A0 = sqrt(S_r / s) V_r^T, B0 = U_r sqrt(S_r / s).
  Training starts on the directions that matter most to the layer; the paper reports faster
  convergence and better final scores than LoRA at the same rank. `pissa_niter_<K>` computes the
  triplets with K subspace iterations of a randomised SVD (Halko et al.), seconds instead of
  minutes for large layers, slightly less exact.
* OLoRA: the QR decomposition W = Q R: B0 = Q_r (orthonormal columns), A0 = R_r (the first r rows).
  Cheaper than an SVD; the paper reports faster convergence than LoRA.

PEFT implements both (`init_lora_weights="pissa" | "pissa_niter_K" | "olora"`) with these formulas;
lorafit computes them in float32 and stores W_res in the base weight's dtype, as PEFT does.

An adapter trained this way applies to W_res, which no one else has. `to_original_base` rewrites
it for the original W (PEFT's `path_initial_model_for_weight_conversion`):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

a plain LoRA of rank 2r with the same scaling (alpha doubled, or times sqrt(2) with rsLoRA).
`save_adapter` always writes that form, so lorafit and PEFT load it on the unmodified base.
DoRA's magnitude carries over unchanged: the direction W_res + s B A is the same matrix.
Embedding layers keep their usual initialisation (A zero, B normal), as in PEFT.
"""

from __future__ import annotations

import math

import torch

from lorafit.lora.config import PISSA_NITER


def decompose(weight: torch.Tensor, r: int, scaling: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for a float32 weight of shape (out, in): s B0 A0 is its rank-r part by `method`."""
    if method == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = PISSA_NITER.fullmatch(method)
    if niter:
        u, s, v = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
        u, s, vh = u, s, v.t()
    else:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return (root.unsqueeze(1) * vh[:r]).contiguous(), (u[:, :r] * root.unsqueeze(0)).contiguous()


@torch.no_grad()
def rewrite_base(layer, method: str) -> None:
    """Set A and B of `layer` from its base weight by `method` and leave the residual in the base."""
    base = layer.base_layer.weight
    if base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"init_lora_weights={method!r} needs a float32, float16 or bfloat16 base weight, "
                        f"got {base.dtype}")
    weight = base.float()
    weight = weight.t() if layer.fan_in_fan_out else weight
    a, b = decompose(weight, layer.r, layer.scaling, method)
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    residual = weight - layer.scaling * (b @ a)
    base.copy_((residual.t() if layer.fan_in_fan_out else residual).to(base.dtype))
    # Non-persistent buffers: they follow .to(device) but stay out of state_dict and the parameters.
    layer.register_buffer("initial_A", layer.lora_A.weight.detach().clone(), persistent=False)
    layer.register_buffer("initial_B", layer.lora_B.weight.detach().clone(), persistent=False)


def rewrites_layer(layer) -> bool:
    return getattr(layer, "initial_A", None) is not None


def to_original_base(tensors: dict[str, torch.Tensor], layers: dict[str, object], prefix: str) -> dict[str, torch.Tensor]:
    """Adapter tensors of a PiSSA/OLoRA model rewritten for the original base: [A; A0] and [B, -B0]."""
    converted = dict(tensors)
    for name, layer in layers.items():
        if not rewrites_layer(layer):
            continue
        a_key, b_key = f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"
        initial_a = layer.initial_A.to(tensors[a_key].device, tensors[a_key].dtype)
        initial_b = layer.initial_B.to(tensors[b_key].device, tensors[b_key].dtype)
        converted[a_key] = torch.cat([tensors[a_key], initial_a], dim=0)
        converted[b_key] = torch.cat([tensors[b_key], -initial_b], dim=1)
    return converted


def from_original_base(saved: dict[str, torch.Tensor], layers: dict[str, object], prefix: str,
                       source: str) -> dict[str, torch.Tensor]:
    """The inverse, for resuming: the trained halves of a converted adapter, after checking that its
    other halves are this model's initial A0, B0 (the same base and initialisation)."""
    from lorafit.errors import UserError

    tensors = dict(saved)
    for name, layer in layers.items():
        if not rewrites_layer(layer):
            continue
        a_key, b_key = f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"
        if a_key not in saved or saved[a_key].shape[0] != 2 * layer.r:
            continue  # the caller's shape check names the problem
        r = layer.r
        a, initial_a = saved[a_key][:r], saved[a_key][r:]
        b, initial_b = saved[b_key][:, :r], -saved[b_key][:, r:]
        if not (torch.allclose(initial_a.float(), layer.initial_A.float().cpu(), atol=1e-4, rtol=1e-3)
                and torch.allclose(initial_b.float(), layer.initial_B.float().cpu(), atol=1e-4, rtol=1e-3)):
            raise UserError(f"{source}: the adapter's initial PiSSA/OLoRA part of {name} differs from this "
                            "model's; was it trained from another base model or initialisation?")
        tensors[a_key], tensors[b_key] = a, b
    return tensors


def file_config_for_original_base(config: dict, use_rslora: bool) -> dict:
    """The adapter_config entries of the rank-2r form: same scaling, a plain LoRA initialisation."""
    factor = math.sqrt(2) if use_rslora else 2
    converted = dict(config, r=2 * config["r"], lora_alpha=config["lora_alpha"] * factor, init_lora_weights=True)
    if config.get("rank_pattern"):
        converted["rank_pattern"] = {key: 2 * value for key, value in config["rank_pattern"].items()}
    if config.get("alpha_pattern"):
        converted["alpha_pattern"] = {key: value * factor for key, value in config["alpha_pattern"].items()}
    return converted
