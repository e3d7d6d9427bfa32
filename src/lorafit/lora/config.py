"""`LoraConfig`: what to adapt and how, validated once, here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

ALL_LINEAR = "all-linear"
# True: A Kaiming-uniform, B zero; False: B random too; then the variants of lora/init.py.
INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_<K>", "olora")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def valid_init(value) -> bool:
    if value is True or value is False:
        return True
    return isinstance(value, str) and (value in ("gaussian", "pissa", "olora") or bool(PISSA_NITER.fullmatch(value)))


def rewrites_base(init_lora_weights) -> bool:
    """PiSSA and OLoRA move the top of the base weight into A and B: the base keeps the residual."""
    return isinstance(init_lora_weights, str) and (init_lora_weights.startswith("pissa") or init_lora_weights == "olora")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters, named as in PEFT so configs and files carry over both ways."""

    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    lora_alpha: float = field(default=32, metadata={"help": "scaling numerator: scaling = alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "module-name suffixes, a regex over full names, or 'all-linear'; nn.Embedding "
                          "modules (embed_tokens) get an embedding LoRA"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "suffixes or a regex of modules never to adapt"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained in full as copies, e.g. embed_tokens, lm_head"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: A Kaiming-uniform, B zero (PEFT's default); 'gaussian'; False: random B; "
                          "'pissa', 'pissa_niter_<K>', 'olora': A and B from the base weight (lora/init.py)"},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: a trained magnitude per output (lora/dora.py)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "adapt only the blocks with these indices (target_modules a list or all-linear)"}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "name of the block list holding the indices ('layers', 'h'); default: any"}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "base weight stored (in, out), as GPT-2's Conv1D"})
    bias: str = field(default="none", metadata={"help": "only 'none' is supported"})
    # Per-module overrides read from PEFT adapters: {pattern: rank} / {pattern: alpha}.
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, (set, tuple)):
            self.layers_to_transform = sorted(self.layers_to_transform)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not valid_init(self.init_lora_weights):
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {', '.join(map(str, INIT_CHOICES))}, "
                             f"got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported; lorafit trains no biases ('none')")
        if not self.target_modules and not self.modules_to_save:
            raise ValueError("LoraConfig needs target_modules (or modules_to_save): nothing would be trained")
        self._check_layer_selection()

    def _check_layer_selection(self) -> None:
        layers = self.layers_to_transform
        if layers is not None and not isinstance(layers, int) and not (
                isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
            raise ValueError(f"LoraConfig.layers_to_transform must be an integer or a list of integers, got {layers!r}")
        if layers is not None and any(i < 0 for i in ([layers] if isinstance(layers, int) else layers)):
            raise ValueError(f"LoraConfig.layers_to_transform holds layer indices (>= 0), got {layers!r}")
        if self.layers_pattern and layers is None:
            raise ValueError("LoraConfig.layers_pattern names where layer indices are; it needs layers_to_transform")
        if layers not in (None, []) and isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise ValueError("LoraConfig.layers_to_transform needs target_modules as a list of names or 'all-linear' "
                             f"(as in PEFT); with a regex, put the layer indices in it: {self.target_modules!r}")

    @property
    def selects_layers(self) -> bool:
        return self.layers_to_transform is not None and self.layers_to_transform != []

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.lora_alpha)
