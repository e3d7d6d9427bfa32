"""Trying a run: its adapter and the base model, loaded side by side for the page's chat.

Both are `lorafit.infer.serve.ServedModel`s (a batching engine each, streaming through the same
OpenAI chunk events `lorafit serve` sends), and requests are checked by serve's own
`parse_chat_request`: the chat panel is a client of the inference code, not a copy of it.
The base model gets the adapter's tokenizer, the one saved by training with the chat template it
rendered the data with, so both sides see exactly the same prompt tokens.
"""

from __future__ import annotations

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
        self._served: dict[str, object] = {}
        self._key: tuple | None = None
        self.adapter: str | None = None
        self.base: str | None = None

    def load(self, adapter: str | Path) -> dict:
        """Load `adapter` and its base (slow: call it from a worker thread); a no-op when already loaded."""
        from lorafit.infer.loading import LoadedModel, check_adapter_folder, choose_base_model, load_for_inference
        from lorafit.infer.serve import ServedModel

        folder = check_adapter_folder(adapter)
        key = (str(folder.resolve()), _mtime(folder / "adapter_model.safetensors"))
        with self._lock:
            if key == self._key:
                return self.describe()
            self._close()
            tuned = load_for_inference(adapter=str(folder))
            base_name = choose_base_model(None, folder)
            plain = load_for_inference(base_name)
            base = LoadedModel(plain.model, tuned.tokenizer, tuned.stop_token_ids, plain.name)
            self._served = {"base": ServedModel(base, self.defaults, MAX_BATCH_SIZE, self.limits),
                            "adapter": ServedModel(tuned, self.defaults, MAX_BATCH_SIZE, self.limits)}
            self._key, self.adapter, self.base = key, str(folder), plain.name
            return self.describe()

    def served(self, slot: str):
        if slot not in SLOTS:
            raise UserError(f"unknown chat side {slot!r}: expected base or adapter")
        served = self._served.get(slot)
        if served is None:
            raise UserError("no model is loaded for the chat: pick a run with an adapter and press Load")
        return served

    def describe(self) -> dict:
        return {"loaded": bool(self._served), "adapter": self.adapter, "base": self.base,
                "defaults": {"max_tokens": self.defaults.max_new_tokens, "temperature": self.defaults.temperature,
                             "top_p": self.defaults.top_p, "top_k": self.defaults.top_k,
                             "repetition_penalty": self.defaults.repetition_penalty}}

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for served in self._served.values():
            served.close()
        self._served, self._key, self.adapter, self.base = {}, None, None, None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
