"""`lorafit <command>`: a flat table of subcommands.

Each command lives in its own module with a ``main(argv) -> int`` function; this file only
dispatches, so `lorafit --help` stays fast (nothing heavy is imported until a command runs).
User mistakes (`UserError` and its kin) print one clear message and exit 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from lorafit.errors import UserError

COMMANDS = {
    # name: (module, one-line help)
    "train": ("lorafit.train.run", "fine-tune a model with LoRA (the run_clm recipe's arguments, or a YAML file)"),
    "data": ("lorafit.data.inspect", "look inside the data pipeline: `lorafit data inspect ...`"),
    "chat": ("lorafit.infer.chat", "multi-turn chat with a model and an optional adapter"),
    "generate": ("lorafit.infer.batch", "answer every prompt of a JSONL file"),
    "merge": ("lorafit.infer.export", "fold an adapter into its base and write a full model folder"),
    "serve": ("lorafit.infer.serve", "OpenAI-compatible HTTP server"),
    "demo": ("lorafit.demo", "the main job on the embedded model (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lorafit <command> [arguments]   (lorafit <command> --help for its arguments)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as error:
        print(f"lorafit {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
