"""Token ids -> text, one token at a time, with stop strings.

Decoding each new token on its own is wrong: byte-level BPE splits one character over several
tokens (an emoji may be 4 byte tokens), and SentencePiece decodes a token's leading space
differently alone than after its neighbour. So, as text-generation-inference does, we decode a
short window of already-shown tokens together with the new ones and emit only the difference, and
wait while the text ends in an incomplete character (U+FFFD).

Stop strings: the answer ends before the first stop string, which is never shown. While the text
ends with something that could still grow into a stop string, that tail is held back.
"""

from __future__ import annotations

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (may extend past a stop string)
        self.shown = 0  # characters of `text` handed out already
        self.stopped = False  # a stop string was found: the answer is complete
        self.finished = False
        self._prefix_offset = 0  # window start: tokens decoded only as context
        self._read_offset = 0  # tokens before this are already part of `text`

    def add(self, token_id: int) -> str:
        """Feed one token; return the new text that is safe to show (possibly empty)."""
        if self.stopped or self.finished:
            return ""
        self.token_ids.append(token_id)
        context = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.token_ids[self._prefix_offset:])
        if len(window) <= len(context) or window.endswith(REPLACEMENT_CHARACTER):
            return ""  # nothing printable yet (a special token, or half a character)
        self.text += window[len(context):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._release()

    def finish(self) -> str:
        """The end of generation: release whatever was held back (minus any stop string)."""
        if self.finished:
            return ""
        if not self.stopped:
            tail = self._decode(self.token_ids[self._prefix_offset:])
            context = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            if len(tail) > len(context):  # a trailing half character: show what the tokenizer gives
                self.text += tail[len(context):]
        released = "" if self.stopped else self._release(final=True)
        self.finished = True
        return released

    @property
    def answer(self) -> str:
        """The text shown so far (after `finish`: the whole answer, cut before any stop string)."""
        return self.text[:self.shown]

    def _release(self, final: bool = False) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        released = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return released

    def _first_stop(self) -> int | None:
        # A stop string can only start at or after the first character not yet shown, minus the
        # part that could have been held back: search from there.
        start = max(0, self.shown - max((len(s) for s in self.stop_strings), default=0))
        found = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
