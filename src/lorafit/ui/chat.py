"""Trying a run: its adapter and the base model, side by side for the page's chat.

One copy of the base model holds the adapter behind a switch (`lorafit.lora.multi`), served by one
`lorafit.infer.serve.ServedModel`: the two sides' requests share its running batch (each row with
or without the adapter), stream through the same OpenAI chunk events `lorafit serve` sends, and
are checked by serve's own `parse_chat_request`: the chat panel is a client of the inference code,
not a copy of it. The base side gets the adapter's tokenizer, the one saved by training with the
chat template it rendered the data with, so both sides see exactly the same prompt tokens.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from lorafit.errors import UserError
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve_limits import ServeLimits

SLOTS = ("base", "adapter")
DEFAULT_OPTIONS = GenerationOptions(max_new_tokens=128)
MAX_BATCH_SIZE = 4


class ChatModels:
    """At most one adapter (and its base) loaded at a time; loading another closes the previous pair."""

    def __init__(self, defaults: GenerationOptions = DEFAULT_OPTIONS, limits: ServeLimits | None = None):
        self.defaults = defaults
        self.limits = limits or ServeLimits(max_new_tokens_limit=2048)
        self._lock = threading.Lock()
        self._served = None  # a ServedModel: the base with the adapter behind a switch
        self._answerers: dict = {}
        self._key: tuple | None = None
        self.adapter: str | None = None
        self.base: str | None = None

    def load(self, adapter: str | Path) -> dict:
        """Load `adapter` and its base (slow: call it from a worker thread); a no-op when already loaded."""
        from lorafit.infer.loading import check_adapter_folder, load_with_adapters
        from lorafit.infer.serve import ServedModel

        folder = check_adapter_folder(adapter)
        key = (str(folder.resolve()), _mtime(folder / "adapter_model.safetensors"))
        with self._lock:
            if key == self._key:
                return self.describe()
            self._close()
            loaded = load_with_adapters(None, {"adapter": folder})
            (tuned,) = loaded.adapters
            # the base side renders and stops as the adapter does: the same prompt tokens on both sides
            loaded = dataclasses.replace(loaded, tokenizer=tuned.tokenizer, stop_token_ids=tuned.stop_token_ids)
            self._served = ServedModel(loaded, self.defaults, 2 * MAX_BATCH_SIZE, self.limits)
            self._answerers = {"base": loaded.answerers[0], "adapter": tuned}
            self._key, self.adapter, self.base = key, str(folder), loaded.name
            return self.describe()

    def served(self, slot: str):
        """The served model and who answers for `slot` ("base" or "adapter")."""
        if slot not in SLOTS:
            raise UserError(f"unknown chat side {slot!r}: expected base or adapter")
        if self._served is None:
            raise UserError("no model is loaded for the chat: pick a run with an adapter and press Load")
        return self._served, self._answerers[slot]

    def describe(self) -> dict:
        return {"loaded": self._served is not None, "adapter": self.adapter, "base": self.base,
                "defaults": {"max_tokens": self.defaults.max_new_tokens, "temperature": self.defaults.temperature,
                             "top_p": self.defaults.top_p, "top_k": self.defaults.top_k,
                             "repetition_penalty": self.defaults.repetition_penalty}}

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._served is not None:
            self._served.close()
        self._served, self._answerers, self._key, self.adapter, self.base = None, {}, None, None, None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
