"""`lorafit chat`: a multi-turn REPL that streams the answer as it is generated.

Each turn renders the whole history with `lorafit.data.render.render_prompt`, the function training
uses for the prefix of an assistant turn, so the model sees the template it was trained on; stop
tokens come from the same template (`end_of_turn_token_ids`). `--show_prompt` prints the rendered
prompt to stderr before each answer.

On a terminal it prompts and streams; when stdin is not a terminal every non-empty line is one user
message and gets one answer, followed by a newline, so it can be scripted:

    printf 'Hi!\\nName three colours.\\n' | lorafit chat --adapter out/adapter
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, TextIO

from lorafit.data.errors import BadRecordError
from lorafit.infer.generate import Completion, PromptTooLongError, context_length, generate
from lorafit.infer.loading import LoadedModel, add_model_arguments, load_from_args
from lorafit.infer.options import GenerationOptions, add_generation_arguments, options_from_args

COMMANDS_HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


class ChatSession:
    """The conversation so far, and how to answer the next user message."""

    def __init__(self, loaded: LoadedModel, options: GenerationOptions, system: str | None = None,
                 show_prompt: Callable[[str], None] | None = None):
        self.loaded = loaded
        self.options = options
        self.system = system
        self.show_prompt = show_prompt
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """The prompt ids, and the messages they hold: the oldest exchanges are dropped when the
        conversation leaves too little room for an answer in the model's context."""
        from lorafit.data.render import render_prompt

        limit = context_length(self.loaded.model)
        room = min(self.options.max_new_tokens, 64)
        ids = render_prompt(self.loaded.tokenizer, messages)
        while limit is not None and len(ids) + room > limit:
            messages = _drop_oldest_exchange(messages)
            if messages is None:
                raise PromptTooLongError(f"this message is too long for the model's context of {limit} tokens")
            ids = render_prompt(self.loaded.tokenizer, messages)
        return ids, messages

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> Completion:
        ids, messages = self.render(self.messages + [{"role": "user", "content": user_text}])
        if self.show_prompt is not None:
            self.show_prompt(self.loaded.tokenizer.decode(ids, skip_special_tokens=False))
        (completion,) = generate(
            self.loaded.model, [ids], self.options, stop_token_ids=self.loaded.stop_token_ids,
            pad_token_id=self.loaded.tokenizer.pad_token_id, tokenizer=self.loaded.tokenizer,
            on_text=lambda _row, text: on_text(text),
        )
        # Only a finished exchange joins the history (an interrupted one raises before this line).
        self.messages = messages + [{"role": "assistant", "content": completion.text}]
        return completion


def _drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """Remove the first user message and everything up to the next user message (system stays)."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if start is None:
        return None
    following_user = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if following_user is None:
        return None
    return messages[:start] + messages[following_user:]


def run_repl(session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO, interactive: bool) -> None:
    """Answer each line; `/reset` and `/exit` are commands. Streams every answer to `out`."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    for line in lines:
        message = line.rstrip("\r\n")
        command = message.strip().lower()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            err.write("(history cleared)\n")
            continue
        try:
            session.reply(message, write)
        except (PromptTooLongError, BadRecordError) as error:  # the template refused, or no room: say so, go on
            err.write(f"error: {error}\n")
        except KeyboardInterrupt:
            if not interactive:
                raise
            err.write("\n(interrupted; this exchange is not kept)")
        write("\n")


def terminal_lines(prompt: str = "you> ") -> Iterable[str]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit chat",
        description="Chat with a model and an optional LoRA adapter; answers stream as they are generated. "
                    f"In the chat, {COMMANDS_HELP}. When stdin is not a terminal, each line is one message "
                    "and gets one answer.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="system prompt (default: whatever the chat template adds, if anything)")
    parser.add_argument("--show_prompt", action="store_true",
                        help="print each rendered prompt (special tokens included) to stderr before the answer")
    add_generation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    interactive = sys.stdin.isatty()
    loaded = load_from_args(args)
    show = None
    if args.show_prompt:
        def show(text: str) -> None:
            sys.stderr.write(f"----- prompt -----\n{text}\n----- end of prompt -----\n")
            sys.stderr.flush()
    session = ChatSession(loaded, options, system=args.system, show_prompt=show)
    if interactive:
        print(f"lorafit chat: {loaded.name}. {COMMANDS_HELP}.", file=sys.stderr)
        lines = terminal_lines()
    else:
        lines = sys.stdin
    run_repl(session, lines, sys.stdout, sys.stderr, interactive)
    return 0
