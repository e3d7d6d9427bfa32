"""`LoraConfig`: what to adapt and how, validated once, here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

ALL_LINEAR = "all-linear"
INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters, named as in PEFT so configs and files carry over both ways."""

    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    lora_alpha: float = field(default=32, metadata={"help": "scaling numerator: scaling = alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "module-name suffixes, a regex over full names, or 'all-linear'"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "suffixes or a regex of modules never to adapt"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained in full as copies, e.g. embed_tokens, lm_head"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    init_lora_weights: Union[bool, str] = field(
        default=True, metadata={"help": "True: A Kaiming-uniform, B zero (PEFT's default); 'gaussian'; False: random B"}
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
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported; lorafit trains no biases ('none')")
        if not self.target_modules and not self.modules_to_save:
            raise ValueError("LoraConfig needs target_modules (or modules_to_save): nothing would be trained")

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.lora_alpha)
