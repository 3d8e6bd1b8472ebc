"""Host-side state of one request: its tokens so far, its text, and when it stops."""

from __future__ import annotations

import dataclasses
import time

from shardinfer.engine.detokenizer import IncrementalDetokenizer
from shardinfer.engine.sampling import SamplingParams
from shardinfer.weights.tokenizer import Tokenizer


@dataclasses.dataclass
class RequestOutput:
    """What generate/chat return for each prompt (vLLM's shape, flattened to one completion)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an end token or stop string) | "length"


@dataclasses.dataclass(eq=False)  # a request is itself: compared (and found) by identity
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    end_ids: frozenset[int]  # EOS (unless ignore_eos) and stop_token_ids
    tokenizer: Tokenizer | None
    max_seq_len: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out by `take_delta`
    finish_reason: str | None = None
    arrived_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    # `text` is kept equal to tokenizer.decode(output_ids) without decoding it all again:
    # `_stable` is the part the detokenizer has returned, `text` adds what it holds back.
    _detokenizer: IncrementalDetokenizer | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _stable: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self._detokenizer = IncrementalDetokenizer(self.tokenizer)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> None:
        """Adds one generated token and decides whether the request is finished."""
        if self.done:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_ids.append(token)
        self.finish_reason = self._finish_reason(token)
        if self.done:
            self.finished_at = now

    def _finish_reason(self, token: int) -> str | None:
        if token in self.end_ids:
            return "stop"
        if self._detokenizer is not None:
            searched = len(self._stable)
            self._stable += self._detokenizer.add(token)
            pending = self._detokenizer.pending
            self.text = self._stable + pending if pending else self._stable
            # Any stop string lying wholly in the old stable text was found last time, so a
            # match now ends past it: only the new tail needs searching.
            cut = min(
                (
                    i
                    for s in self.params.stop
                    if (i := self.text.find(s, max(0, searched - len(s) + 1))) >= 0
                ),
                default=-1,
            )
            if cut >= 0:
                self.text = self.text[:cut]
                return "stop"
        total = len(self.prompt_ids) + len(self.output_ids)
        if len(self.output_ids) >= self.params.max_tokens or total >= self.max_seq_len:
            return "length"
        return None

    def take_delta(self) -> str:
        """New text since the last call. While running, holds back an incomplete UTF-8
        character and any tail that could still become a stop string."""
        end = len(self.text)
        if not self.done:
            # Characters before `emitted` are out already, so the scan stops there (a long
            # run of U+FFFD would otherwise be walked on every call).
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            for stop in self.params.stop:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:n], 0, end):  # no copy of text[:end]
                        end -= n
                        break
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta

    def output(self) -> RequestOutput:
        return RequestOutput(
            list(self.prompt_ids), list(self.output_ids), self.text, self.finish_reason or "length"
        )
