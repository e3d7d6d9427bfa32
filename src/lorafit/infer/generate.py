"""Answer a fixed list of prompts at once: the one-call front end of the batching engine.

All prompts start together (one left-padded prefill) and each row leaves the batch when it
finishes, through `lorafit.infer.engine.BatchingEngine`, the same scheduler and decode step
`lorafit serve` runs. A row ends at a stop token (end of turn / EOS:
`lorafit.data.templates.end_of_turn_token_ids`), at a stop string, or after `max_new_tokens`.
"""

from __future__ import annotations

from typing import Callable

from lorafit.errors import UserError
from lorafit.infer.engine import BatchingEngine, Completion, PromptTooLongError, context_length

__all__ = ["Completion", "PromptTooLongError", "context_length", "generate"]

# on_text(row, new_text) -> False to stop that row early (e.g. the client went away).
TextCallback = Callable[[int, str], "bool | None"]


def generate(
    model,
    prompts: list[list[int]],
    options,
    *,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int | None = None,
    tokenizer=None,
    on_text: TextCallback | None = None,
    adapter_id: str | None = None,
) -> list[Completion]:
    """Generate an answer for each prompt (a list of token ids), all in one batch.

    `tokenizer` is needed for text (the answers, streaming with `on_text`, stop strings); without
    it only `token_ids` are filled in. Use `temperature=0` for greedy decoding. With a seed, every
    row draws from its own generator seeded with it. `adapter_id` picks one of the model's named
    adapters (`lorafit.lora.multi`) for every prompt.
    """
    if not prompts:
        raise UserError("every prompt needs at least one token")
    engine = BatchingEngine(model, tokenizer, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                            max_batch_size=len(prompts))
    requests = [engine.submit(prompt, options, on_text=_for_row(on_text, row), adapter_id=adapter_id)
                for row, prompt in enumerate(prompts)]
    engine.run_until_idle()
    return [request.done.result() for request in requests]


def _for_row(on_text: TextCallback | None, row: int):
    return None if on_text is None else (lambda text: on_text(row, text))
