"""`lorafit <command>`: a flat table of subcommands.

Each command lives in its own module with a ``main(argv) -> int`` function; this file only
dispatches, so `lorafit --help` stays fast (nothing heavy is imported until a command runs).
User mistakes (`UserError` and its kin) print one clear message and exit 2, never a traceback;
`--debug` (anywhere on the line) or `LORAFIT_DEBUG=1` prints the traceback too. A training run
stopped before its end (`TrainingStopped`) prints how to resume and exits with its own code.
When stdout or stderr is not a terminal, no command draws progress bars (`lorafit.plain_output`).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from lorafit.errors import TrainingStopped, UserError
from lorafit.plain_output import use_plain_output

DEBUG_FLAG = "--debug"
# Import-time chatter of libraries that transformers imports for every command: bitsandbytes (via
# peft) warns on CPUs with AVX512-BF16 that an optional 4-bit kernel could not be fetched from the
# hub, which says nothing about the command at hand (4-bit layers fall back to its own kernels).
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")

COMMANDS = {
    # name: (module, one-line help)
    "train": ("lorafit.train.run", "fine-tune a model with LoRA (the run_clm recipe's arguments, or a YAML file)"),
    "data": ("lorafit.data.inspect", "look inside the data pipeline: `lorafit data inspect ...`"),
    "chat": ("lorafit.infer.chat", "multi-turn chat with a model and an optional adapter"),
    "generate": ("lorafit.infer.batch", "answer every prompt of a JSONL file"),
    "merge": ("lorafit.infer.export", "fold an adapter into its base and write a full model folder"),
    "export": ("lorafit.export.command", "an adapter or the merged model as GGUF (llama.cpp, Ollama, LM Studio)"),
    "serve": ("lorafit.infer.serve", "OpenAI-compatible HTTP server"),
    "eval": ("lorafit.evaluate.command", "base model and adapters side by side: checked answers, held-out loss, tasks"),
    "ui": ("lorafit.ui.command", "a web page to set up, preview, train, watch and try a fine-tune"),
    "demo": ("lorafit.demo", "the main job on the embedded model (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lorafit [--debug] <command> [arguments]   (lorafit <command> --help for its arguments)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--debug (or LORAFIT_DEBUG=1): show the traceback behind an error message"]
    return "\n".join(lines)


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare `--debug` (one not followed by a value: `lorafit train --debug underflow_overflow`
    is the Trainer's own flag and stays) and say whether debugging is on."""
    kept, debug = [], os.environ.get("LORAFIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    while argv and argv[0] == DEBUG_FLAG:  # `lorafit --debug <command> ...`
        argv, debug = argv[1:], True
    for index, token in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if token == DEBUG_FLAG and (following is None or following.startswith("-")):
            debug = True
        else:
            kept.append(token)
    return kept, debug


def quiet_import_chatter() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"lorafit: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    use_plain_output()  # before the command imports transformers or datasets: they read the switches then
    quiet_import_chatter()
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"lorafit {name}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if debug:
            traceback.print_exc()
        print(f"lorafit {name}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"lorafit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
