"""Graceful stop: SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) ends training at a step boundary.

The signal only raises a flag; the current optimizer step finishes, a checkpoint is written (the
same checkpoint a scheduled save writes, so resuming from it gives the uninterrupted result), and
training stops. `lorafit train` then exits non-zero, naming the command that resumes the run. A
second signal stops at once, without a checkpoint (the last complete one is still on disk).

In a multi-process run the flag is agreed at each step end (one all-reduce of a scalar), so every
process stops after the same step even when the signal reaches them at different moments.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStopCallback(TrainerCallback):
    """Catches SIGINT and SIGTERM while the Trainer trains; `received` is the signal that stopped it."""

    def __init__(self):
        self.received: int | None = None
        self._previous_handlers: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; elsewhere the defaults stay
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self.received is not None:
            self.restore_handlers()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signum
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(sys.stderr.fileno(), (
            f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
            "(send it again to stop at once, without one)\n").encode())

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args)
        if signum:
            self.received = signum
            control.should_save = True
            control.should_training_stop = True

    def _agreed_signal(self, args) -> int:
        local = self.received or 0
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return local
        flag = torch.tensor([local], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """Put back the handlers found at the start (also called when training raised)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
