"""`lorafit chat`: a multi-turn REPL that streams the answer as it is generated.

Each turn renders the whole history with `lorafit.data.render.render_prompt`, the function training
uses for the prefix of an assistant turn, so the model sees the template it was trained on; stop
tokens come from the same template (`end_of_turn_token_ids`). `--show_prompt` prints the rendered
prompt to stderr before each answer.

On a terminal it prompts and streams; when stdin is not a terminal every non-empty line is one user
message and gets one answer, followed by a newline, so it can be scripted:

    printf 'Hi!\\nName three colours.\\n' | lorafit chat --adapter out/adapter

With `--adapter` given more than once (`--adapter a=out/a --adapter b=out/b`) every message is
answered by each adapter, side by side: one line `[a] answer`, one line `[b] answer`, and each
adapter keeps its own conversation.

A message that cannot be answered (stdin bytes that are not UTF-8, a message too long for the
model's context even with no history, one the chat template refuses) is reported on stderr naming
its line, gets an empty answer line (so answers stay one per line), and the chat goes on; piped,
the run then ends with exit code 2 and one message listing those lines.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

from lorafit.data.errors import BadRecordError
from lorafit.data.json_records import is_text
from lorafit.errors import UserError
from lorafit.infer.generate import Completion, PromptTooLongError, context_length, generate
from lorafit.infer.loading import Answerer, LoadedModel, add_model_arguments, load_from_args
from lorafit.infer.options import GenerationOptions, add_generation_arguments, options_from_args

COMMANDS_HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


class ChatSession:
    """The conversation so far, and how to answer the next user message."""

    def __init__(self, loaded: LoadedModel, options: GenerationOptions, system: str | None = None,
                 show_prompt: Callable[[str], None] | None = None, answerer: Answerer | None = None):
        self.loaded = loaded
        self.answerer = answerer or loaded.answerers[0]  # which adapter answers, with its template and stops
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
        tokenizer = self.answerer.tokenizer
        ids = render_prompt(tokenizer, messages)
        while limit is not None and len(ids) + room > limit:
            messages = _drop_oldest_exchange(messages)
            if messages is None:
                raise PromptTooLongError(f"this message is too long for the model's context of {limit} tokens")
            ids = render_prompt(tokenizer, messages)
        return ids, messages

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> Completion:
        ids, messages = self.render(self.messages + [{"role": "user", "content": user_text}])
        if self.show_prompt is not None:
            self.show_prompt(self.answerer.tokenizer.decode(ids, skip_special_tokens=False))
        (completion,) = generate(
            self.loaded.model, [ids], self.options, stop_token_ids=self.answerer.stop_token_ids,
            pad_token_id=self.loaded.tokenizer.pad_token_id, tokenizer=self.answerer.tokenizer,
            on_text=lambda _row, text: on_text(text), adapter_id=self.answerer.adapter_id,
        )
        # Only a finished exchange joins the history (an interrupted one raises before this line).
        self.messages = messages + [{"role": "assistant", "content": completion.text}]
        return completion


class SideBySide:
    """One conversation per adapter (`--adapter` given more than once): each user message is
    answered by every adapter in turn, each answer on its own line after `[name] `, and each
    adapter keeps its own history (its own answers)."""

    def __init__(self, sessions: list[ChatSession], write: Callable[[str], None]):
        self.sessions = sessions
        self.write = write  # where the separators go: the stream the answers go to

    def reset(self) -> None:
        for session in self.sessions:
            session.reset()

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> list[Completion]:
        completions = []
        for index, session in enumerate(self.sessions):
            if index:
                self.write("\n")
            self.write(f"[{session.answerer.name}] ")
            completions.append(session.reply(user_text, on_text))
        return completions


def _drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """Remove the first user message and everything up to the next user message (system stays)."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if start is None:
        return None
    following_user = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if following_user is None:
        return None
    return messages[:start] + messages[following_user:]


@dataclass
class UnreadableLine:
    """A line of stdin that is not text: reported in place of a message."""

    reason: str


def run_repl(session: ChatSession, lines: Iterable[str | UnreadableLine], out: TextIO, err: TextIO,
             interactive: bool) -> list[int]:
    """Answer each line; `/reset` and `/exit` are commands. Streams every answer to `out`; returns
    the numbers of the lines that got no answer (each reported on `err` as it happened)."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    unanswered = []
    for number, line in enumerate(lines, start=1):
        where = "" if interactive else f"stdin line {number}: "
        if isinstance(line, UnreadableLine):
            err.write(f"error: {where}{line.reason}\n")
            unanswered.append(number)
            write("\n")
            continue
        message = line.rstrip("\r\n")
        command = message.strip().lower()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            err.write("(history cleared)\n")
            continue
        try:
            session.reply(message, write)
        except (PromptTooLongError, BadRecordError) as error:  # the template refused, or no room: say so, go on
            err.write(f"error: {where}{error}\n")
            unanswered.append(number)
        except KeyboardInterrupt:
            if not interactive:
                raise
            err.write("\n(interrupted; this exchange is not kept)")
        write("\n")
    return unanswered


def stdin_lines(stream: BinaryIO) -> Iterator[str | UnreadableLine]:
    """The lines of piped stdin as text (a leading byte order mark skipped); a line that is not UTF-8
    comes as an `UnreadableLine` naming the byte, not as a UnicodeDecodeError from the text layer."""
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield UnreadableLine(f"invalid UTF-8 (byte 0x{raw[error.start:error.start + 1].hex()} at column "
                                 f"{error.start + 1}); lorafit chat reads UTF-8 text")
            continue
        yield text.removeprefix("\ufeff") if number == 1 else text


def terminal_lines(prompt: str = "you> ") -> Iterable[str | UnreadableLine]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except UnicodeDecodeError:
            yield UnreadableLine("that line is not valid UTF-8 text")
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


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    if args.system is not None and not is_text(args.system):
        raise UserError("--system is not valid UTF-8 text")
    interactive = sys.stdin.isatty()
    loaded = load_from_args(args)
    show = None
    if args.show_prompt:
        def show(text: str) -> None:
            sys.stderr.write(f"----- prompt -----\n{text}\n----- end of prompt -----\n")
            sys.stderr.flush()
    sessions = [ChatSession(loaded, options, system=args.system, show_prompt=show, answerer=answerer)
                for answerer in loaded.compared]
    session = sessions[0] if len(sessions) == 1 else SideBySide(sessions, _write_stdout)
    if interactive:
        names = ", ".join(session.answerer.name for session in sessions)
        print(f"lorafit chat: {names}. {COMMANDS_HELP}.", file=sys.stderr)
        lines = terminal_lines()
    else:
        lines = stdin_lines(sys.stdin.buffer)
    unanswered = run_repl(session, lines, sys.stdout, sys.stderr, interactive)
    if unanswered and not interactive:
        shown = ", ".join(map(str, unanswered[:20])) + (" ..." if len(unanswered) > 20 else "")
        raise UserError(f"{len(unanswered)} line{'s' if len(unanswered) > 1 else ''} of stdin got no answer "
                        f"(line{'s' if len(unanswered) > 1 else ''} {shown}; reasons above)")
    return 0
