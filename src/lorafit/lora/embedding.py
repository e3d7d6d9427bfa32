"""LoRA on an embedding table: a low-rank update of the token vectors, in PEFT's layout.

An embedding looks up row x of its table E (vocab x dim). LoRA adds a rank-r update to every row:

    E' = E + s (B A)^T,   A: r x vocab,  B: dim x r,   so   embed'(x) = E[x] + s A[:, x]^T B^T

A column of A is a token's r coordinates, B maps them into the model's space. A starts at zero
and B Gaussian (LoRA's reference code, and PEFT's `lora_embedding_A` / `lora_embedding_B`, with the
same shapes and names, no `.weight` suffix in the file), so a fresh adapter is the identity.

When it helps: a model that must use tokens it saw little or never (a new name, special tokens
added to the vocabulary) can move their vectors for r * (vocab + dim) parameters, where
`modules_to_save=["embed_tokens"]` trains (and stores) the whole vocab x dim table. The update
touches the input embeddings only; a tied output head keeps the base table, as in PEFT.
No dropout on this path (PEFT applies none either), and PiSSA/OLoRA keep this initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.fold import fold, unfold


class LoraEmbedding(nn.Module):
    """Wraps an nn.Embedding: `base_layer(x) + scaling * embed(x, A^T) B^T`."""

    def __init__(self, base_layer: nn.Embedding, r: int, lora_alpha: float, scaling: float | None = None,
                 init_lora_weights: bool | str = True, adapter_dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r if scaling is None else scaling
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        device = base_layer.weight.device
        device = None if device.type == "meta" else device
        dtype = adapter_dtype or (torch.float32 if base_layer.weight.dtype in (torch.float16, torch.bfloat16)
                                  else base_layer.weight.dtype)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=dtype))
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        with torch.no_grad():
            if init_lora_weights is False:  # a random, non-identity start (tests, research), as PEFT
                nn.init.normal_(self.lora_embedding_A)
            else:
                nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under the names PEFT's files use after `<module path>.`."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        a = self.lora_embedding_A.to(result.dtype)
        rows = F.embedding(x, a.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        b = (self.lora_embedding_B * self.scaling).to(result.dtype)
        update = rows @ b.t()
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings scale the update too
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
        return result + update

    def delta_weight(self) -> torch.Tensor:
        """scaling * (B A)^T, shaped as the table (vocab x dim), float32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scaling

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.float() + self.delta_weight().to(weight.device)

    def merge(self, keep_original: bool = True) -> None:
        fold(self, keep_original)

    def unmerge(self) -> None:
        unfold(self)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"
