"""`LLM`: generate, chat and stream over a sharded model (the offline front end)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from shardinfer.compile_cache import DEFAULT_CACHE_DIR, enable_compilation_cache
from shardinfer.engine.engine import Engine
from shardinfer.engine.metrics import EngineMetrics
from shardinfer.engine.request import Request, RequestOutput
from shardinfer.engine.sampling import SamplingParams
from shardinfer.engine.scheduler import Scheduler
from shardinfer.mesh import MeshSpec
from shardinfer.model import DEFAULT_MODEL, Model, check_token_ids, load_model
from shardinfer.weights.host_cache import DEFAULT_WEIGHT_CACHE_DIR

Prompt = str | Sequence[int]

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


class LLM:
    """A model plus an engine of `max_batch` decode slots, sharded over the mesh.

    Any number of requests go through the slots with continuous batching: a finished request's
    slot is refilled at once while the others keep decoding.
    """

    def __init__(
        self,
        model_or_source: Model | str = DEFAULT_MODEL,
        mesh: Mesh | MeshSpec = None,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        dtype: Any = None,
        compilation_cache: str | Path | None = DEFAULT_CACHE_DIR,
        quantize: str | None = None,
        layer_loop: str | None = None,
        weight_cache: str | Path | None = DEFAULT_WEIGHT_CACHE_DIR,
    ):
        # Before anything compiles: a later process with the same shapes loads, not compiles.
        enable_compilation_cache(compilation_cache)
        if isinstance(model_or_source, Model):
            self.model = model_or_source
        else:
            self.model = load_model(model_or_source, mesh, dtype, quantize=quantize,
                                    layer_loop=layer_loop, weight_cache=weight_cache)  # fmt: skip
        cfg, data = self.model.config, self.model.data_size
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Rows split evenly over the `data` axis, so round the batch up to a multiple of it.
        self.max_batch = -(-max_batch // data) * data
        self.max_seq_len = min(max_seq_len or 2048, cfg.max_position_embeddings)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.tokenizer = self.model.tokenizer
        self.engine = Engine(self.model, self.max_batch, self.max_seq_len)
        self.scheduler = Scheduler(self.engine)

    @property
    def metrics(self) -> EngineMetrics:
        return self.scheduler.metrics

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompt_ids = self._prompt_ids(prompts)
        requests = self._requests(prompt_ids, params)
        for _ in self._run(requests):
            pass
        return [r.output() for r in requests]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template."""
        tokenizer = self._require_tokenizer()
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompt_ids = [
            tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]
        return self.generate(prompt_ids, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt, as they are produced."""
        self._require_tokenizer()
        request = self.new_request(prompt, params)
        for _ in self._run([request]):
            delta = request.take_delta()
            if delta:
                yield delta

    def new_request(self, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """A validated request (ValueError otherwise), not yet queued: for front ends that
        drive the scheduler themselves, such as the HTTP server's engine thread."""
        (request,) = self._requests(self._prompt_ids([prompt]), params)
        return request

    # ---- input handling ---------------------------------------------------------------------

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer

    def _prompt_ids(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int | np.integer)
        ):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a string, a list of strings or lists of token ids")
        out = []
        for i, p in enumerate(prompts):
            ids = self._require_tokenizer().encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            check_token_ids(np.asarray(ids), self.model.config.vocab_size)
            if len(ids) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, "
                    "which must leave room for at least one new token"
                )
            out.append([int(t) for t in ids])
        return out

    def _requests(self, prompt_ids, params) -> list[Request]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompt_ids)} prompts")
        eos = frozenset(self.model.config.eos_token_ids)
        for p in params:
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; this model has none")
        return [
            Request(
                ids,
                p,
                (frozenset() if p.ignore_eos else eos) | set(p.stop_token_ids),
                self.tokenizer,
                self.max_seq_len,
            )
            for ids, p in zip(prompt_ids, params, strict=True)
        ]

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self, requests: list[Request]) -> Iterator[None]:
        """Queues the requests and steps the engine until they are all done; yields after every
        step so that callers can stream. A caller that stops early aborts what is left."""
        for r in requests:
            self.scheduler.add(r)
        try:
            while not all(r.done for r in requests):
                self.scheduler.step()
                yield
        finally:
            for r in requests:
                if not r.done:
                    self.scheduler.abort(r)
