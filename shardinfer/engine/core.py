"""The engine core: requests in (validated, tokenized), outputs out, one step at a time.

Every front end sits on this: `LLM` (Python), the HTTP server's async engine, the batch
runner. Validation lives here only, so each of them refuses the same input with the same
message. A step is plan (scheduler, host) -> execute (engine, devices) -> commit (host).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from shardinfer.engine.broadcast import (
    IDLE,
    broadcast_plan,
    buffer_size,
    is_master,
    multi_process,
)
from shardinfer.engine.engine import Engine
from shardinfer.engine.metrics import EngineMetrics, compilations
from shardinfer.engine.params import SamplingParams
from shardinfer.engine.request import Request
from shardinfer.engine.scheduler import Scheduler
from shardinfer.model import Model, check_token_ids
from shardinfer.weights.tokenizer import Tokenizer

Prompt = str | Sequence[int]
KEEP_ALIVE_SECONDS = 1.0
DEFAULT_MAX_SEQ_LEN = 2048  # positions per slot when the caller gives none (and the model allows)
Message = dict[str, str]


def slot_length(model: Model, max_seq_len: int | None) -> int:
    """Positions per slot: what was asked (default DEFAULT_MAX_SEQ_LEN), within the model's."""
    return min(max_seq_len or DEFAULT_MAX_SEQ_LEN, model.config.max_position_embeddings)


class EngineCore:
    def __init__(self, model: Model, max_batch: int, max_seq_len: int, seed: int | None = None):
        """`max_batch` slots (rounded up to a multiple of the `data` axis); `seed` feeds the
        seeds of requests that bring none (default: random)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if model.family.kind != "decoder":
            raise ValueError(
                f"{model.config.architecture} is an {model.family.kind} family: it embeds text "
                "and cannot generate; use it through an embedding front end"
            )
        data = model.data_size
        self.model = model
        self.max_batch = -(-max_batch // data) * data  # rows split evenly over `data`
        self.max_seq_len = max_seq_len
        self.engine = Engine(model, self.max_batch, max_seq_len)
        self.scheduler = Scheduler(self.engine.layout, seed)
        # Words of the plan broadcast when the mesh spans processes (0: one process).
        self._wire = buffer_size(self.engine.layout) if multi_process() else 0
        self._last_sent = time.monotonic()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.model.tokenizer

    @property
    def metrics(self) -> EngineMetrics:
        return self.scheduler.metrics

    # ---- validation: the one place --------------------------------------------------------

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer

    def prompt_ids(self, prompt: Prompt, index: int | None = None) -> list[int]:
        """A prompt (text, or token ids) as checked token ids; ValueError names what is wrong
        (and which prompt of several, by `index`)."""
        name = "prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{name} is empty")
            ids = self.require_tokenizer().encode(prompt)
        elif isinstance(prompt, Sequence | np.ndarray):
            ids = list(prompt)
        else:
            raise ValueError(f"{name} must be a string or a list of token ids")
        if not ids:
            raise ValueError(f"{name} is empty")
        check_token_ids(np.asarray(ids), self.model.config.vocab_size)
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"{name} has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, "
                "which must leave room for at least one new token"
            )
        return [int(t) for t in ids]

    def chat_ids(self, messages: list[Message], index: int | None = None) -> list[int]:
        """A conversation through the model's chat template, as token ids."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        tokenizer = self.tokenizer
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            contents = [m.get("content") for m in messages]
            if all(isinstance(c, str) and not c.strip() for c in contents):
                which = "the conversation" if index is None else f"conversation {index}"
                raise ValueError(f"{which} has no non-empty message")
        text = tokenizer.apply_chat_template(messages)  # checks the messages' form
        return self.prompt_ids(tokenizer.encode(text, add_special_tokens=False), index)

    def room(self, prompt_ids: list[int]) -> int:
        """New tokens that fit after this prompt."""
        return self.max_seq_len - len(prompt_ids)

    def make_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Request:
        """A request for checked prompt ids (see `prompt_ids`), not yet queued."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        eos = frozenset() if params.ignore_eos else frozenset(self.model.config.eos_token_ids)
        return Request(
            prompt_ids, params, eos | set(params.stop_token_ids), self.tokenizer, self.max_seq_len
        )

    # ---- running ------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request: Request) -> None:
        self.scheduler.abort(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[Request]:
        """One step: the requests that got a token (none when there is nothing to do).

        In a multi-process run this is process 0's: its plan is broadcast, and every other
        process executes it in `follow`."""
        plan = self.scheduler.plan()
        if plan is None:
            return []
        try:
            if self._wire:
                broadcast_plan(plan, self._wire)
                self._last_sent = time.monotonic()
            result = self.engine.execute(plan)
        except Exception:
            # Fail what ran (its cache may be gone), keep the queue, start the cache afresh:
            # the next step works again.
            self.scheduler.fail(plan)
            self.engine.reset_cache()
            raise
        return self.scheduler.commit(plan, result)

    def run(self, requests: Sequence[Request]) -> Iterator[list[Request]]:
        """Queues the requests and steps until they are all done, yielding each step's touched
        requests (for streaming). A caller that stops early aborts what is left. In a
        multi-process run, the other processes follow (`follow`) until this run ends."""
        for r in requests:
            self.add(r)
        try:
            while not all(r.done for r in requests):
                yield self.step()
        finally:
            for r in requests:
                if not r.done:
                    self.abort(r)
            if self._wire:
                broadcast_plan(None, self._wire)  # DONE: the followers return

    def follow(self) -> None:
        """A process other than 0: executes process 0's plans until it says the run is over."""
        if not self._wire or is_master():
            raise RuntimeError("follow() is for the processes other than 0 of a multi-process run")
        while (plan := broadcast_plan(None, self._wire)) is not None:
            if plan != IDLE:
                self.engine.execute(plan)

    def keep_alive(self) -> None:
        """Process 0 with nothing to do (a server between requests): tells the followers so
        about once a second, so that they never wait on a collective for long (and a dead
        follower is noticed while idle too)."""
        if self._wire and time.monotonic() - self._last_sent > KEEP_ALIVE_SECONDS:
            broadcast_plan(IDLE, self._wire)
            self._last_sent = time.monotonic()

    def close(self) -> None:
        """Process 0: the followers return from `follow` (a server shutting down)."""
        if self._wire and is_master():
            broadcast_plan(None, self._wire)

    @property
    def leads(self) -> bool:
        """Whether this process plans (process 0, or the only one)."""
        return not self._wire or is_master()

    def warmup(self) -> dict[str, float]:
        """Compiles (or loads from the persistent cache) every step shape; returns the
        seconds it took and the programs it lowered."""
        if self.has_work():
            raise RuntimeError("warmup() runs before any request is queued")
        before = compilations()
        report = self.engine.warmup()
        return {**report, "programs": compilations() - before}
