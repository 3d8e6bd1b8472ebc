"""`LLM`: generate, chat and stream over a sharded model (the offline front end)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from shardinfer.compile_cache import DEFAULT_CACHE_DIR, enable_compilation_cache
from shardinfer.engine.broadcast import multi_process, share_json
from shardinfer.engine.core import EngineCore, Prompt, slot_length
from shardinfer.engine.metrics import EngineMetrics
from shardinfer.engine.params import SamplingParams
from shardinfer.engine.request import RequestOutput
from shardinfer.mesh import MeshSpec
from shardinfer.model import DEFAULT_MODEL, Model, load_model
from shardinfer.weights.host_cache import DEFAULT_WEIGHT_CACHE_DIR

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
        seed: int | None = None,
    ):
        """`seed` feeds the seeds of requests that bring none (default: random)."""
        if max_batch < 1:  # before anything loads
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Before anything compiles: a later process with the same shapes loads, not compiles.
        enable_compilation_cache(compilation_cache)
        if isinstance(model_or_source, Model):
            self.model = model_or_source
        else:
            self.model = load_model(model_or_source, mesh, dtype, quantize=quantize,
                                    layer_loop=layer_loop, weight_cache=weight_cache)  # fmt: skip
        max_seq_len = slot_length(self.model, max_seq_len)
        self.core = EngineCore(self.model, max_batch, max_seq_len, seed)
        self.max_batch, self.max_seq_len = self.core.max_batch, max_seq_len
        self.tokenizer = self.model.tokenizer

    @property
    def metrics(self) -> EngineMetrics:
        return self.core.metrics

    def warmup(self) -> dict[str, float]:
        """Compiles (or loads from the persistent cache) every step shape this engine can
        produce for its max_batch and max_seq_len, so no later workload compiles anything."""
        return self.core.warmup()

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompts = _as_list(prompts)
        prompt_ids = [self.core.prompt_ids(p, i) for i, p in enumerate(prompts)]
        return self._generate(prompt_ids, params)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompt_ids = [self.core.chat_ids(c, i) for i, c in enumerate(conversations)]
        return self._generate(prompt_ids, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt, as they are produced (on process 0 of a multi-process
        run; the other processes yield nothing and return when it is done)."""
        self.core.require_tokenizer()
        if not self.core.leads:
            self.core.make_request(self.core.prompt_ids(prompt), params)  # the same checks
            self.core.follow()
            return
        request = self.core.make_request(self.core.prompt_ids(prompt), params)
        for _ in self.core.run([request]):
            delta = request.take_delta()
            if delta:
                yield delta

    def _generate(self, prompt_ids: list[list[int]], params) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompt_ids)} prompts")
        requests = [
            self.core.make_request(ids, p) for ids, p in zip(prompt_ids, params, strict=True)
        ]
        if not self.core.leads:  # another process plans: execute its steps, then its results
            self.core.follow()
            return [RequestOutput(**o) for o in share_json(None)]
        for _ in self.core.run(requests):
            pass
        outputs = [r.output() for r in requests]
        if multi_process():
            share_json([dataclasses.asdict(o) for o in outputs])
        return outputs


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int | np.integer)
    ):
        return [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a list of strings or lists of token ids")
    return list(prompts)
