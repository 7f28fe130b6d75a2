"""Text out of a stream of token ids: incremental detokenization and stop strings.

A token does not always stand for whole characters (a byte-level BPE splits one emoji
over several tokens, SentencePiece drops a word's leading space when the word is decoded
alone), so the text of new tokens is the difference between two decodes that start at
the same earlier token, and it is held back while it ends in an incomplete character.
The idea is vLLM's ``detokenize_incrementally`` (prefix and read offsets).

Stop strings are matched on the text, not on tokens: a stop string may span tokens or
end inside one. The text is cut before the first match, and a tail that could still
begin one is held back until it no longer can, so no client ever sees part of a stop
string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class DecodeWith:
    """A tokenizer's decode with one request's vLLM options (``skip_special_tokens``,
    ``spaces_between_special_tokens``; `avmp.engine.tokenizer.Tokenizer.decode`)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, spaces: bool) -> None:
        self._tokenizer = tokenizer
        self._options = {"skip_special_tokens": skip_special_tokens,
                         "spaces_between_special_tokens": spaces}  # fmt: skip

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, **self._options))


class IncrementalDetokenizer:
    """The text of one request's output, a piece per new batch of tokens.

    Keeps every token id and two offsets into them: ``prefix`` (where the decode that
    is compared starts) and ``read`` (the tokens whose text has been given out). The
    text given out, joined, equals the decode of all tokens where the tokenizer's
    decode is consistent under concatenation.
    """

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text that ``token_ids`` complete ("" while a character is partial)."""
        self._ids.extend(token_ids)
        if self._read == len(self._ids):
            return ""
        before = self._decoder.decode(self._ids[self._prefix : self._read])
        after = self._decoder.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever text the held-back tokens spell, even an incomplete character (the
        request has ended, nothing more will complete it)."""
        if self._read == len(self._ids):
            return ""
        before = self._decoder.decode(self._ids[self._prefix : self._read])
        after = self._decoder.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else after


@dataclass(frozen=True)
class TextPiece:
    """What a request may show now: ``text`` (new, safe to send) and whether a stop
    string ended it."""

    text: str
    stopped: bool


class StopStrings:
    """Cuts one request's text at the first stop string.

    Holds back the tail that could still be the beginning of a stop string; `finish`
    releases it once the request has ended without a match. ``include``: the text ends
    after the stop string rather than before it (vLLM's ``include_stop_str_in_output``).
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._sent = 0
        self.stopped = False

    def add(self, text: str, match: bool = True) -> TextPiece:
        """Append ``text``; the part that can be sent, cut at a stop string if one
        now appears (after which everything more is ignored). ``match=False``: no stop
        string may end it yet (``min_tokens``), everything is sent, and later matches
        are looked for in the text after it."""
        if self.stopped:
            return TextPiece("", True)
        self._text += text
        if not match:
            return self._send(len(self._text), stopped=False)
        found = self._first_match(self._sent)  # what was sent held no match, nor began one
        if found is not None:
            self.stopped = True
            return self._send(found[1] if self._include else found[0], stopped=True)
        return self._send(len(self._text) - self._held(), stopped=False)

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        return "" if self.stopped else self._send(len(self._text), stopped=False).text

    @property
    def text(self) -> str:
        """All the text sent so far."""
        return self._text[: self._sent]

    def _held(self) -> int:
        """How many characters at the end could begin a stop string: the longest
        unsent suffix that is a proper prefix of one."""
        for size in range(min(self._hold, len(self._text) - self._sent), 0, -1):
            if any(stop.startswith(self._text[-size:]) for stop in self._stops):
                return size
        return 0

    def _first_match(self, start: int) -> tuple[int, int] | None:
        """Where the first stop string from ``start`` on begins and ends (the longest of
        those that begin there)."""
        found = [(i, -len(s)) for s in self._stops if (i := self._text.find(s, start)) >= 0]
        if not found:
            return None
        begin, minus_size = min(found)
        return begin, begin - minus_size

    def _send(self, end: int, stopped: bool) -> TextPiece:
        piece = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return TextPiece(piece, stopped)
