"""Several named adapters on one base model: switch between them, or give each batch row its own.

`load_adapters(model, {"persona": dir1, "sql": dir2})` loads each adapter (lorafit or PEFT files)
and puts one `AdapterSwitch` where any of them adapts a module: the switch holds the frozen base
module and each adapter's version of it (a `LoraLinear`, a `LoraEmbedding`, or a `modules_to_save`
copy), all sharing the one base weight, so n adapters cost their own small tensors and nothing else.
Every switch of a model reads one `AdapterRouting`, which says who answers:

- `set_active_adapter(model, name)`: that adapter for every row (None: the base model, which is
  also what `disable_adapters(model)` gives for the length of a `with` block). A module the
  active adapter does not touch runs its base; the active version computes exactly as it does
  when that adapter is loaded alone (the same `LoraLinear.forward`), so outputs are identical.
- `route_rows(model, ["persona", None, "sql", ...])`: one adapter (or None, the base) per batch
  row, for the length of a `with` block. This is how one served batch answers requests for
  different adapters (S-LoRA, Punica; vLLM's `--lora-modules`). In a plain LoRA linear layer each
  row gathers its own A and B from a stack of all adapters (a zero slot for the base and for
  adapters that leave the module alone) and the update is two batched matmuls:

      y_i = W x_i + (s_k B_k) (A_k x_i),   k = adapter of row i
      h = bmm(x, A_stack[k]^T);  y = baddbmm(W x, h, (s B)_stack[k]^T)   (ranks padded with zeros)

  Padding a rank with zero rows of A and zero columns of B adds exact zeros, so a row's result is
  its adapter's update whatever the other rows use. Other versions (DoRA, embeddings, modules
  trained in full) run once per adapter present on that adapter's rows. When every row has the
  same adapter the switch takes the single-adapter path.

Adapters that rewrite the base weight (PiSSA/OLoRA files not converted to the original base)
cannot share one base with others and are refused by name. The switches are for inference and
comparison; training uses one adapter (`add_lora`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.lora.config import rewrites_base
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.inject import lora_layers, saved_modules
from lorafit.lora.layer import LoraLinear

NAME = re.compile(r"[^\s/]+")


@dataclass
class AdapterRouting:
    """Which adapter answers: `active` for every row, or `rows` (one name or None per row) when set."""

    names: tuple[str, ...]
    active: str | None = None
    rows: tuple[str | None, ...] | None = None
    _row_slots: dict = field(default_factory=dict, repr=False)  # (rows, device) -> LongTensor of slots

    def slot(self, name: str | None) -> int:
        """0 for the base model, i + 1 for the i-th adapter."""
        return 0 if name is None else self.names.index(name) + 1

    def row_slots(self, device: torch.device) -> torch.Tensor:
        key = (self.rows, str(device))
        if key not in self._row_slots:
            self._row_slots.clear()
            self._row_slots[key] = torch.tensor([self.slot(n) for n in self.rows], dtype=torch.long, device=device)
        return self._row_slots[key]

    def check(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise UserError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")


class AdapterSwitch(nn.Module):
    """One base module and the versions of it that some adapters bring (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, versions: dict[int, nn.Module], routing: AdapterRouting):
        super().__init__()
        self.base_layer = base_layer
        # keyed by slot (1 + the adapter's index); the base (slot 0) is `base_layer`
        self.versions = nn.ModuleDict({str(slot): module for slot, module in versions.items()})
        self.routing = routing
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered A and s*B, built on first use
        self.train(base_layer.training)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def version(self, slot: int) -> nn.Module:
        return self.versions[str(slot)] if str(slot) in self.versions else self.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.routing
        if routing.rows is None:
            return self.version(routing.slot(routing.active))(x, *args, **kwargs)
        slots = routing.row_slots(x.device)
        if x.shape[0] != slots.shape[0]:
            raise RuntimeError(f"route_rows was given {slots.shape[0]} rows but the batch has {x.shape[0]}")
        if not args and not kwargs and self._gathers(x):
            return self._gathered(x, slots)
        return self._per_adapter(x, slots, *args, **kwargs)

    def _gathers(self, x: torch.Tensor) -> bool:
        """Plain LoRA linear versions, not training, on [rows, tokens, features] input."""
        return x.dim() == 3 and not self.training and all(
            type(v) is LoraLinear and v.lora_magnitude_vector is None and not v.merged and not v.lora_dropout.active
            for v in self.versions.values())

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A [slots, r_max, in] and s*B [slots, out, r_max], zero where a slot does not adapt this module."""
        if self._stack is None:
            versions = {int(slot): v for slot, v in self.versions.items()}
            first = next(iter(versions.values()))
            rank = max(v.r for v in versions.values())
            slots = len(self.routing.names) + 1
            weight_a = first.lora_A.weight
            a = torch.zeros(slots, rank, first.in_features, dtype=weight_a.dtype, device=weight_a.device)
            b = torch.zeros(slots, first.out_features, rank, dtype=weight_a.dtype, device=weight_a.device)
            with torch.no_grad():
                for slot, v in versions.items():
                    a[slot, : v.r] = v.lora_A.weight
                    b[slot, :, : v.r] = v.lora_B.weight * v.scaling
            self._stack = (a, b)
        return self._stack

    def _gathered(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b = self._stacked()
        dtype = result.dtype
        h = torch.bmm(x.to(dtype), a.index_select(0, slots).to(dtype).transpose(1, 2))  # [rows, tokens, r]
        return torch.baddbmm(result, h, b.index_select(0, slots).to(dtype).transpose(1, 2))

    def _per_adapter(self, x: torch.Tensor, slots: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = None
        for slot in slots.unique().tolist():
            rows = (slots == slot).nonzero().squeeze(1)
            y = self.version(slot)(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out

    def extra_repr(self) -> str:
        names = [self.routing.names[int(slot) - 1] for slot in self.versions]
        return f"adapters={names}"


def load_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> AdapterRouting:
    """Load each named adapter folder into `model` (a base model without LoRA) behind switches.

    Returns the model's `AdapterRouting` (also `model.lora_routing`), with the base model active."""
    from lorafit.lora.adapter_io import load_adapter, read_adapter_config
    from lorafit.lora.merge import remove_lora

    if not adapters:
        raise UserError("no adapters to load")
    if any(isinstance(m, (LoraLinear, LoraEmbedding, AdapterSwitch)) for m in model.modules()):
        raise UserError("this model already has adapters; load several adapters into a fresh base model")
    for name in adapters:
        if not NAME.fullmatch(name):
            raise UserError(f"adapter name {name!r}: use a non-empty name without spaces or '/'")
    routing = AdapterRouting(tuple(adapters))
    bases: dict[str, nn.Module] = {}  # module path -> the base module
    versions: dict[str, dict[int, nn.Module]] = {}  # module path -> {slot: adapted version}
    depth: dict[str, int] = {}
    for slot, (name, path) in enumerate(adapters.items(), start=1):
        init = read_adapter_config(path).get("init_lora_weights", True)
        if rewrites_base(init):  # loading it would rewrite the shared base weights into a residual
            raise UserError(f"adapter {name!r} ({path}) was saved for a PiSSA/OLoRA residual base "
                            "(init_lora_weights), which cannot be shared with other adapters: save it "
                            "converted to the original base, or load it alone")
        try:
            load_adapter(model, path)
        except UserError as error:
            raise UserError(f"adapter {name!r}: {error}") from None
        for module_path, layer in list(lora_layers(model)):
            bases.setdefault(module_path, layer.base_layer)
            versions.setdefault(module_path, {})[slot] = layer
            depth[module_path] = module_path.count(".")
        for module_path, wrapper in list(saved_modules(model)):
            bases.setdefault(module_path, wrapper.original_module)
            versions.setdefault(module_path, {})[slot] = wrapper.trained
            depth[module_path] = module_path.count(".")
        remove_lora(model)
    for module_path in sorted(versions, key=lambda p: -depth[p]):  # inner switches before outer ones
        parent_name, _, child = module_path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdapterSwitch(bases[module_path], versions[module_path], routing))
    model.requires_grad_(False)
    model.lora_routing = routing
    return routing


def routing_of(model: nn.Module) -> AdapterRouting | None:
    return getattr(model, "lora_routing", None)


def _routing(model: nn.Module) -> AdapterRouting:
    routing = routing_of(model)
    if routing is None:
        raise UserError("this model has no named adapters (load them with load_adapters)")
    return routing


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` answer for every row (None: the base model)."""
    routing = _routing(model)
    routing.check(name)
    routing.active = name


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    routing = _routing(model)
    routing.check(name)
    before, routing.active = routing.active, name
    try:
        yield
    finally:
        routing.active = before


def disable_adapters(model: nn.Module):
    """`with disable_adapters(model):` the base model answers, whichever adapter is active."""
    return active_adapter(model, None)


@contextmanager
def route_rows(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Row i of the next calls is answered by adapter `names[i]` (None: the base model)."""
    routing = _routing(model)
    for name in set(names):
        routing.check(name)
    before = routing.active, routing.rows
    if len(set(names)) == 1:  # one adapter for the whole batch: the single-adapter path
        routing.active, routing.rows = names[0], None
    else:
        routing.rows = tuple(names)
    try:
        yield
    finally:
        routing.active, routing.rows = before
