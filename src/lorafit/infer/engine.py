"""Continuous batching: one running batch that requests join and leave between decode steps.

A decode step reads every weight of the model to produce one token per row, and reading them for
eight rows costs little more than for one; answering requests one after the other wastes that. So
the engine keeps one running batch (`DecodeBatch`, one KV cache for all rows) and at each `step`:

1. rows whose client left (`GenerationRequest.cancel`) leave;
2. waiting requests join while there is room (`max_batch_size`): they are prefilled together, each
   chooses its first token, and their cache rows are spliced into the running batch;
3. one model call feeds every row its newest token; each row chooses its next token with its own
   settings and its own seeded generator, its text is decoded incrementally (streaming, stop
   strings), and the rows that finish leave.

A row sees what it would see alone: padding is masked, position ids count its own tokens, and its
draws come from its own generator. (Greedy answers are the solo answers as long as batched matrix
products round alike, which `tests/infer/test_engine.py` checks on a tiny model and
`bench/bench_serve.py` on the embedded one.)

`lorafit serve` runs `run_forever` in one thread while request handlers `submit` from others;
`generate` (and `lorafit generate`) submit their prompts and call `step` until they are answered.
A server bounds what it holds: with `max_queued`, `submit` refuses (`QueueFullError`) a request
that would make more than `max_batch_size + max_queued` unfinished ones, and a request given a
`timeout` leaves at the first step after its deadline (waiting or running) with finish reason
"timeout". Cancelled and expired requests leave the waiting queue at every step, so the room
they held is free at once.
Each request names its `adapter_id`: on a model holding several named adapters
(`lorafit.lora.multi.load_adapters`) the rows of one batch are answered by different adapters
(or the base, None), each row applying its own A and B (`route_rows`) in the same model call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import nullcontext
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from lorafit.errors import UserError
from lorafit.infer.decode_batch import DecodeBatch
from lorafit.infer.detokenize import IncrementalDecoder
from lorafit.infer.options import GenerationOptions
from lorafit.infer.requests import (  # noqa: F401  (Completion, PromptTooLongError, QueueFullError: re-exported)
    Completion,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    TextCallback,
    allowed_context,
    context_length,
    settle_unrun,
)
from lorafit.infer.sampling import choose_next_tokens_per_row, make_generator
from lorafit.lora.multi import route_rows, routing_of

DEFAULT_MAX_BATCH_SIZE = 8


@dataclass(eq=False)
class _Row:
    """A request in the running batch, with everything that is its own."""

    request: GenerationRequest
    completion: Completion
    room: int  # the most tokens it may produce: max_new_tokens, cut to what fits in the context
    decoder: IncrementalDecoder | None  # None without a tokenizer: token ids only
    generator: torch.Generator | None  # None for greedy
    seen: torch.Tensor | None  # [1, vocab] tokens already in its text, for the repetition penalty
    error: BaseException | None = None  # raised by its on_text callback
    finished: bool = False


class BatchingEngine:
    """The scheduler and the batched decode step; see the module docstring."""

    def __init__(self, model, tokenizer=None, *, stop_token_ids=(), pad_token_id: int | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queued: int | None = None,
                 max_model_len: int | None = None):
        """`max_queued`: the most requests waiting beyond the running batch (None: no limit).
        `max_model_len`: the context length to allow, at most the model's (None: the model's)."""
        if max_batch_size < 1:
            raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
        if max_queued is not None and max_queued < 0:
            raise UserError(f"--max_queued_requests must be 0 or more, got {max_queued}")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(stop_token_ids)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.stop_token_ids or (0,))[0]
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.context_length = allowed_context(context_length(model), max_model_len)
        self._waiting: deque[GenerationRequest] = deque()
        self._wake = threading.Condition()  # an RLock inside: guards `_waiting`, `_unfinished`, `_closed`
        self._unfinished = 0  # submitted requests whose `done` has not resolved (waiting + running)
        self._closed = False
        self._rows: list[_Row] = []  # the running batch, in DecodeBatch row order
        self._batch: DecodeBatch | None = None
        self._newest_tokens: torch.Tensor | None = None  # [rows]: chosen, not yet fed to the model

    # --- the interface -----------------------------------------------------------------------

    def submit(self, prompt: list[int], options: GenerationOptions, *, on_text: TextCallback | None = None,
               stop_token_ids: tuple[int, ...] | list[int] | None = None,
               adapter_id: str | None = None, timeout: float | None = None) -> GenerationRequest:
        """Queue one answer (thread-safe); it joins the batch at a coming step. `stop_token_ids`
        None means the engine's (end of turn / EOS). `timeout`: seconds from now after which it
        leaves, finished or not. Raises `QueueFullError` when `max_queued` requests already wait."""
        if not prompt:
            raise UserError("every prompt needs at least one token")
        if options.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        routing = routing_of(self.model)
        if routing is not None:
            routing.check(adapter_id)
        elif adapter_id is not None:
            raise UserError(f"adapter {adapter_id!r} asked for, but this model holds no named adapters")
        if self.context_length is not None and len(prompt) >= self.context_length:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens but the model's context length is "
                                     f"{self.context_length}: shorten it")
        stops = self.stop_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        request = GenerationRequest(list(prompt), options, on_text, stops, adapter_id, deadline)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self.max_queued is not None and self._unfinished >= self.max_batch_size + self.max_queued:
                self._sweep_waiting(time.monotonic())  # rooms held by requests already cancelled
                if self._unfinished >= self.max_batch_size + self.max_queued:
                    raise QueueFullError(self._unfinished, self.max_queued)
            self._unfinished += 1
            request.done.add_done_callback(self._release)
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def unfinished(self) -> int:
        """Requests submitted and not yet answered, waiting or running."""
        with self._wake:
            return self._unfinished

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def idle(self) -> bool:
        with self._wake:
            return not self._rows and not self._waiting

    @torch.inference_mode()
    def step(self) -> None:
        """Rows that were cancelled (or ran out of time) leave, waiting requests join, then one decode step."""
        try:
            with self._wake:
                self._sweep_waiting(time.monotonic())
            self._leave_if_cancelled()
            self._admit()
            if self._rows:
                self._decode()
        except Exception as error:  # the batch is lost; its requests learn why, later ones still run
            self._fail_running(error)

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def run_forever(self) -> None:
        """Serve submissions until `close()` (run it in its own thread)."""
        while True:
            with self._wake:
                while not self._closed and not self._rows and not self._waiting:
                    self._wake.wait()
                if self._closed:
                    break
            self.step()
        for row in self._rows:
            row.request.cancel()
        self._leave_if_cancelled()
        with self._wake:
            leftovers, self._waiting = list(self._waiting), deque()
        for request in leftovers:
            settle_unrun(request, None)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="lorafit-engine", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    # --- the steps ---------------------------------------------------------------------------

    def _release(self, _done: Future) -> None:  # a request's `done` resolved, in whichever thread
        with self._wake:
            self._unfinished -= 1

    def _sweep_waiting(self, now: float) -> None:
        """Settle waiting requests that were cancelled or ran out of time (call holding `_wake`)."""
        if not any(r.cancelled.is_set() or r.expired(now) or r.done.cancelled() for r in self._waiting):
            return
        keep = deque()
        for request in self._waiting:
            if request.cancelled.is_set() or request.done.cancelled():
                settle_unrun(request, None)  # it left before its turn: nothing was generated
            elif request.expired(now):
                settle_unrun(request, Completion(text="", prompt_tokens=len(request.prompt), finish_reason="timeout"))
            else:
                keep.append(request)
        self._waiting = keep

    def _leave_if_cancelled(self) -> None:
        now = time.monotonic()
        for row in self._rows:
            reason = "cancelled" if row.request.cancelled.is_set() else "timeout" if row.request.expired(now) else None
            if reason and not row.finished:
                row.completion.finish_reason = reason
                self._finish(row, flush=False)
        self._drop_finished()

    def _admit(self) -> None:
        if self._batch is not None and not self._batch.can_join:
            return  # this cache cannot take rows mid-flight: newcomers wait for an empty batch
        group = self._take_waiting(self.max_batch_size - len(self._rows))
        if not group:
            return
        rows = [self._new_row(request) for request in group]
        try:
            with self._routed(rows):
                batch, logits = DecodeBatch.prefill(self.model, [r.request.prompt for r in rows], self.pad_token_id)
            tokens = self._choose(logits, rows)
        except Exception as error:  # only this group is lost; the running batch goes on
            for row in rows:
                row.error = error
                self._finish(row, flush=False)
            return
        if self._batch is None:
            self._batch, self._newest_tokens = batch, tokens
        else:
            self._batch.join(batch)
            self._newest_tokens = torch.cat([self._newest_tokens, tokens])
        self._rows += rows
        self._take_tokens(rows, tokens)
        self._drop_finished()

    def _take_waiting(self, room: int) -> list[GenerationRequest]:
        group = []
        with self._wake:
            while self._waiting and len(group) < room:
                request = self._waiting.popleft()
                if request.cancelled.is_set():
                    settle_unrun(request, None)  # it left before its turn: nothing was generated
                elif request.done.set_running_or_notify_cancel():
                    group.append(request)
        return group

    def _decode(self) -> None:
        with self._routed(self._rows):
            logits = self._batch.step(self.model, self._newest_tokens)
        self._newest_tokens = self._choose(logits, self._rows)
        self._take_tokens(self._rows, self._newest_tokens)
        self._drop_finished()

    def _routed(self, rows: list[_Row]):
        """Each row's own adapter for the model calls inside the block (nothing to do without adapters)."""
        if routing_of(self.model) is None:
            return nullcontext()
        return route_rows(self.model, [row.request.adapter_id for row in rows])

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        tokens = choose_next_tokens_per_row(logits, [r.request.options for r in rows], [r.seen for r in rows],
                                            [r.generator for r in rows])
        for index, row in enumerate(rows):
            if row.seen is not None:
                row.seen[0, tokens[index]] = True
        return tokens

    def _take_tokens(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        for row, token in zip(rows, tokens.tolist()):  # the one host sync per step
            if not row.finished:
                self._take_token(row, token)

    def _take_token(self, row: _Row, token: int) -> None:
        completion = row.completion
        completion.completion_tokens += 1
        if token in row.request.stop_token_ids:
            completion.finish_reason = "stop"
            return self._finish(row)
        completion.token_ids.append(token)
        if row.decoder is not None:
            new_text = row.decoder.add(token)
            if new_text and not self._emit(row, new_text):
                completion.finish_reason = "cancelled"
                return self._finish(row, flush=False)
            if row.decoder.stopped:  # a stop string appeared
                completion.finish_reason = "stop"
                return self._finish(row)
        if completion.completion_tokens >= row.room:
            self._finish(row)

    def _emit(self, row: _Row, text: str) -> bool:
        """Hand new text to the row's callback; False when the row must stop."""
        if row.request.on_text is None:
            return True
        try:
            return row.request.on_text(text) is not False
        except Exception as error:  # the caller's problem, reported through its own future
            row.error = error
            return False

    def _finish(self, row: _Row, flush: bool = True) -> None:
        row.finished = True
        completion = row.completion
        if row.decoder is not None:
            tail = row.decoder.finish() if flush else ""
            if tail:
                self._emit(row, tail)
            completion.text = row.decoder.answer
            if row.decoder.stopped and completion.finish_reason == "length":
                completion.finish_reason = "stop"  # the stop string showed up in the last characters
        if row.error is not None:
            row.request.done.set_exception(row.error)
        else:
            row.request.done.set_result(completion)

    def _drop_finished(self) -> None:
        keep = [index for index, row in enumerate(self._rows) if not row.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._batch, self._newest_tokens = [], None, None
            return
        self._batch.keep_rows(keep)
        self._newest_tokens = self._newest_tokens[torch.tensor(keep, device=self._newest_tokens.device)]
        self._rows = [self._rows[index] for index in keep]

    def _fail_running(self, error: Exception) -> None:
        for row in self._rows:
            if not row.finished:
                row.error = error
                self._finish(row, flush=False)
        self._rows, self._batch, self._newest_tokens = [], None, None

    def _new_row(self, request: GenerationRequest) -> _Row:
        options, prompt = request.options, request.prompt
        room = options.max_new_tokens
        if self.context_length is not None:
            room = min(room, self.context_length - len(prompt))
        device = self.model.device
        seen = None
        if options.repetition_penalty != 1.0:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
            seen[0, torch.tensor(prompt, dtype=torch.long, device=device)] = True
        return _Row(
            request=request,
            completion=Completion(text="", prompt_tokens=len(prompt)),
            room=room,
            decoder=IncrementalDecoder(self.tokenizer, options.stop) if self.tokenizer is not None else None,
            generator=None if options.greedy else make_generator(options.seed, device),
            seen=seen,
        )
