"""What a request to the batching engine is, and what it gets back.

A `GenerationRequest` is one answer to produce (prompt ids, options, callbacks, deadline, which
adapter); its `done` future resolves to a `Completion`. The engine (`lorafit.infer.engine`) owns
the scheduling; this module owns the shapes and the checks that need no model call.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from lorafit.errors import UserError
from lorafit.infer.options import GenerationOptions

# on_text(new_text) -> False to stop this answer (e.g. the client went away); called from the engine's thread.
TextCallback = Callable[[str], "bool | None"]


@dataclass
class Completion:
    text: str  # the answer, without stop tokens and cut before any stop string
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    # "stop" (stop token or string), "length" (max_new_tokens or the context), "cancelled", "timeout"
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the model produced, stop token included (what was paid for)


class PromptTooLongError(UserError):
    """The prompt leaves no room for an answer within the model's context length."""


class QueueFullError(RuntimeError):
    """`submit` found `max_batch_size` requests running and `max_queued` waiting: try again later."""

    def __init__(self, unfinished: int, max_queued: int):
        super().__init__(f"{unfinished} requests are unfinished ({max_queued} may wait for a batch row)")
        self.unfinished, self.max_queued = unfinished, max_queued


def context_length(model) -> int | None:
    """The most positions the model was built for (None when its config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(eq=False)
class GenerationRequest:
    """One answer to produce. `done` resolves to its `Completion`, or to None when it was cancelled
    before it joined the batch; `cancel()` makes a running one leave at the next step."""

    prompt: list[int]
    options: GenerationOptions
    on_text: TextCallback | None = None
    stop_token_ids: tuple[int, ...] = ()  # end of turn / EOS: the token ends the answer and is not part of it
    adapter_id: str | None = None  # which named adapter answers this row; None: the model as loaded (the base)
    deadline: float | None = None  # time.monotonic() after which it leaves with finish_reason "timeout"
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: Future = field(default_factory=Future)

    def cancel(self) -> None:
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def allowed_context(model_context: int | None, max_model_len: int | None) -> int | None:
    if max_model_len is None:
        return model_context
    if max_model_len < 2:
        raise UserError(f"--max_model_len must be at least 2 (one prompt token and one new one), got {max_model_len}")
    if model_context is not None and max_model_len > model_context:
        raise UserError(f"--max_model_len {max_model_len} is more than this model's context length "
                        f"({model_context} tokens); leave it out or lower it")
    return max_model_len


def settle_unrun(request: GenerationRequest, value) -> None:
    """Settle a request that never ran (its future may have been cancelled by an async waiter)."""
    if request.done.set_running_or_notify_cancel():
        request.done.set_result(value)
