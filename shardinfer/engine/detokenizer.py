"""Incremental detokenization: the text of a growing token list, with constant work per token.

Decoding the whole output again for every new token is quadratic. Instead (vLLM's
prefix/read-offset scheme) only a small window of recent tokens is decoded: it starts one
segment before the newest tokens, so that decoders which treat a sequence's first token
specially (a stripped leading space) still see the newer tokens in context.

The tokenizers library's `DecodeStream` does the same, but it never returns what an
incomplete character at the end decodes to, so it cannot reproduce `decode(ids)` when the
output stops mid-character; hence this class, which also says what is held back (`pending`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardinfer.weights.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what lossy UTF-8 decoding writes for incomplete or invalid bytes


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text equal to `tokenizer.decode(all_ids)`
    (special tokens skipped), i.e. `"".join(added pieces) + pending == decode(ids)`.

    No prompt context is taken: the text is that of the output ids alone, as a full decode
    of them gives (a first token's leading space is treated as decode treats it).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # The window: ids from the start of the context segment on. `_read` is where the
        # tokens not yet known to end on a complete character start; both it and the window
        # start are points where the text ended cleanly, so decoding from there is exact.
        self._window: list[int] = []
        self._read = 0
        self._done = 0  # characters of decode(window) already returned by `add`
        self._pending = ""

    @property
    def pending(self) -> str:
        """Text decode(ids) has past what `add` returned: trailing U+FFFD characters, which
        the next tokens may still turn into a character (or leave as they are)."""
        return self._pending

    def add(self, token_id: int) -> str:
        """Takes one token; returns the text it completes ("" while a character's bytes are
        still incomplete, or for a skipped special token)."""
        self._window.append(token_id)
        text = self._tokenizer.decode(self._window)
        # Every character before a trailing run of U+FFFD is final; the run itself may be
        # an incomplete character that the next token completes, so it is held back.
        stable = len(text.rstrip(_REPLACEMENT))
        new = text[self._done : max(stable, self._done)]
        self._done = max(stable, self._done)
        self._pending = text[self._done :]
        if new and not self._pending:
            # The text ends on a complete character: the newest tokens become the context
            # for the next ones and everything before them is dropped, keeping the window
            # a few tokens long. Decoded again because, in context or not, the context's
            # own text can differ (a leading space).
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._done = len(self._tokenizer.decode(self._window))
        return new
