"""The device side of generation: prefill requests, insert them into slots, decode all slots.

The shapes of every jitted call come from a small fixed set (the slot count, and one prompt
bucket per power of two up to max_seq_len), so a steady workload compiles nothing after warm-up.
The cache is owned here, passed into each step and donated, never hidden in the model.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardinfer.engine.kv_cache import KVCache, init_cache, insert, resize, write_at
from shardinfer.engine.sampling import SamplingArrays, sample
from shardinfer.model import Model
from shardinfer.xla_options import step_compiler_options

MIN_BUCKET = 16
# Requests that arrive together are prefilled together, up to this many rows at a time; a
# lone request is prefilled alone. Two row counts keep the set of compiled shapes small.
PREFILL_ROWS = 8
# The cache's smallest length; it grows (and shrinks) in powers of two with the furthest
# position in use, so a decode step attends over the whole array and never slices it (on
# XLA:CPU a slice of the cache was a copy per layer, ~30% of a batch-32 step).
DECODE_MIN_CACHE = 128


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), capped at limit."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, limit)


def prefill_logits(graphdef, state, tokens, lengths):
    """tokens [B, T] right-padded, lengths [B] -> logits [B, V] at each last prompt token, and
    every layer's k/v [B, T, ...] (which `insert` copies into the cache)."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, new_kv = model(tokens, positions)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    return model.logits(last)[:, 0], new_kv


def decode_logits(graphdef, state, cache: KVCache, tokens, positions, cache_len: int = 0):
    """tokens [B] at positions [B] -> logits [B, V] for the token after each, and this step's
    k/v (which `write_at` puts into the cache). With `cache_len`, attention reads only the
    first cache_len positions (all < cache_len)."""
    model = nnx.merge(graphdef, state)
    hidden, new_kv = model(tokens[:, None], positions[:, None], cache, cache_len)
    return model.logits(hidden)[:, 0], new_kv


class Engine:
    """`slots` decode rows over the model's mesh (rows split evenly over the `data` axis)."""

    def __init__(self, model: Model, slots: int, max_seq_len: int):
        self.model, self.slots, self.max_seq_len = model, slots, max_seq_len
        graphdef = model.graphdef

        def prefill(state, tokens, lengths, sampling):
            logits, kv = prefill_logits(graphdef, state, tokens, lengths)
            return sample(logits, lengths, *sampling), kv

        def decode(state, cache, tokens, positions, sampling):
            logits, new_kv = decode_logits(graphdef, state, cache, tokens, positions)
            return sample(logits, positions + 1, *sampling), new_kv

        options = step_compiler_options(model.platform, model.dtype, model.quantize)
        jit = partial(jax.jit, compiler_options=options)
        self._prefill = jit(prefill)
        self._insert = jit(insert, donate_argnums=(0,))
        # The step reads the cache and a second call writes the new k/v in place: in one
        # program, XLA:CPU copied the whole (donated) cache twice per step to order the
        # attention's reads before the in-place write.
        self._decode = jit(decode)
        self._write = jit(write_at, donate_argnums=(0,))
        self._resize = jit(resize, static_argnums=(1,))  # a new shape: nothing to donate
        self.capacity = min(DECODE_MIN_CACHE, max_seq_len)
        stacked = model.layer_loop == "scan"
        cfg, sharder = model.config, model.sharder
        self.cache = init_cache(cfg, sharder, slots, self.capacity, model.dtype, stacked)

    def fit_cache(self, needed: int) -> None:
        """Resizes the cache to the power-of-two bucket holding `needed` positions (at least
        DECODE_MIN_CACHE, at most max_seq_len); positions beyond the new length must be unused."""
        capacity = max(bucket_length(needed, self.max_seq_len),
                       min(DECODE_MIN_CACHE, self.max_seq_len))  # fmt: skip
        if capacity != self.capacity:
            self.cache = self._resize(self.cache, capacity)
            self.capacity = capacity

    @property
    def data_shards(self) -> int:
        return self.model.data_size

    def shard_of(self, slot: int) -> int:
        """Which `data` shard holds a slot's cache row (rows are split in contiguous blocks)."""
        return slot // (self.slots // self.data_shards)

    @property
    def prefill_rows(self) -> int:
        return min(PREFILL_ROWS, self.slots)

    def prefill(self, prompts: list[list[int]], sampling: SamplingArrays):
        """Runs up to `prefill_rows` prompts together (padded to one length bucket, and to 1 or
        `prefill_rows` rows); returns each one's first sampled token and the k/v of all rows
        (not yet in a slot)."""
        n = len(prompts)
        rows = 1 if n == 1 else self.prefill_rows
        width = bucket_length(max(len(p) for p in prompts), self.max_seq_len)
        self.fit_cache(max(width, self.capacity))  # `insert` writes `width` positions
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one dummy token
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
            lengths[i] = len(prompt)
        padded = SamplingArrays(*(np.resize(a, rows) for a in sampling.as_tuple()))
        first, kv = self._prefill(self.model.state, tokens, lengths, padded.as_tuple())
        return [int(t) for t in np.asarray(first)[:n]], kv

    def insert(self, kv: KVCache, slots: list[int | None]) -> None:
        """Row i of a prefill's k/v into cache row slots[i]; rows given None, and rows beyond
        `slots` (padding), are dropped."""
        values = (kv[0] if isinstance(kv, list) else kv).v  # [(layers,) rows, kv, T, head_dim]
        rows = values.shape[-4]
        targets = np.full(rows, self.slots, np.int32)  # out of range: dropped
        for row, slot in enumerate(slots):
            if slot is not None:
                targets[row] = slot
        self.cache = self._insert(self.cache, kv, targets)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, sampling: SamplingArrays):
        """One step for every slot: tokens/positions [slots] -> next tokens [slots] (host).

        The cache first fits the furthest position (`fit_cache`): attention reads all of it,
        and reading all of max_seq_len every step cost more than the weights at batch 32."""
        self.fit_cache(int(positions.max()) + 1)
        put = self._put_rows
        device_positions = put(positions)
        new, new_kv = self._decode(
            self.model.state,
            self.cache,
            put(tokens),
            device_positions,
            tuple(put(a) for a in sampling.as_tuple()),
        )
        self.cache = self._write(self.cache, new_kv, device_positions)
        return np.asarray(new)

    def _put_rows(self, array: np.ndarray) -> jax.Array:
        """A host array whose first axis is the slots, placed with rows split over `data`.

        Copied first: on CPU the device array may share the numpy buffer, and the scheduler
        updates its arrays in place while the cache write of this step can still be running."""
        axes = ("batch",) + (None,) * (array.ndim - 1)
        sharding = self.model.sharder.sharding(axes, array.shape)
        return jax.device_put(np.array(array, copy=True), sharding)
