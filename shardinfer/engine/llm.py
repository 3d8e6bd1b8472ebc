"""`LLM`: generate, chat and stream over a sharded model (the offline front end)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from shardinfer.engine.kv_cache import init_cache
from shardinfer.engine.request import Request, RequestOutput
from shardinfer.engine.sampling import SamplingArrays, SamplingParams
from shardinfer.engine.steps import jit_steps
from shardinfer.mesh import MeshSpec
from shardinfer.model import DEFAULT_MODEL, Model, check_token_ids, load_model

Prompt = str | Sequence[int]
MIN_BUCKET = 16

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), capped at limit."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, limit)


class LLM:
    """A model plus a KV cache of `max_batch` rows, sharded over the mesh.

    Requests run in batches of up to `max_batch` rows: one prefill, then one jitted decode step
    per token for the whole batch, until every row has stopped.
    """

    def __init__(
        self,
        model_or_source: Model | str = DEFAULT_MODEL,
        mesh: Mesh | MeshSpec = None,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        dtype: Any = None,
    ):
        if isinstance(model_or_source, Model):
            self.model = model_or_source
        else:
            self.model = load_model(model_or_source, mesh=mesh, dtype=dtype)
        cfg, data = self.model.config, self.model.data_size
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Rows split evenly over the `data` axis, so round the batch up to a multiple of it.
        self.max_batch = -(-max_batch // data) * data
        self.max_seq_len = min(max_seq_len or 2048, cfg.max_position_embeddings)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.tokenizer = self.model.tokenizer
        self._prefill, self._decode = jit_steps(self.model.graphdef)
        self._cache = None
        self.last_decode_tokens_per_s = 0.0

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
        (request,) = self._requests(self._prompt_ids([prompt]), params)
        for _ in self._run([request]):
            delta = request.take_delta()
            if delta:
                yield delta

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
        """Runs requests batch by batch; yields after every step so callers can stream."""
        for start in range(0, len(requests), self.max_batch):
            yield from self._run_batch(requests[start : start + self.max_batch])

    def _run_batch(self, batch: list[Request]) -> Iterator[None]:
        model, rows = self.model, self.max_batch
        if self._cache is None:
            self._cache = init_cache(
                model.config, model.sharder, rows, self.max_seq_len, model.dtype
            )
        width = bucket_length(max(len(r.prompt_ids) for r in batch), self.max_seq_len)
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one dummy token
        for i, r in enumerate(batch):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
        sampling = SamplingArrays.for_rows([r.params for r in batch] + [None] * (rows - len(batch)))
        put = self._put_rows
        new, self._cache = self._prefill(
            model.state,
            self._cache,
            put(tokens),
            put(lengths),
            tuple(map(put, sampling.as_tuple())),
        )
        sampling_on_device = tuple(map(put, sampling.as_tuple()))
        positions = lengths.copy()
        new = np.asarray(new)
        for i, r in enumerate(batch):
            r.append(int(new[i]))
        yield
        while not all(r.done for r in batch):
            # Finished and padding rows keep stepping (fixed shapes); keep them inside the cache.
            positions = np.minimum(positions, self.max_seq_len - 1)
            new, self._cache = self._decode(
                model.state, self._cache, put(new), put(positions), sampling_on_device
            )
            new = np.asarray(new)
            positions = positions + 1
            for i, r in enumerate(batch):
                r.append(int(new[i]))
            yield

    def _put_rows(self, array: np.ndarray) -> jax.Array:
        """A host array whose first axis is the batch, placed with rows split over `data`."""
        axes = ("batch",) + (None,) * (array.ndim - 1)
        return jax.device_put(array, self.model.sharder.sharding(axes, array.shape))
