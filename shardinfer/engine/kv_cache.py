"""The KV cache: an explicit pytree (k and v for all layers), passed into and out of each step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from shardinfer.config import ModelConfig
from shardinfer.models.llama import LayerKV
from shardinfer.sharding import Sharder

KVCache = LayerKV  # k, v: [layers, batch, kv_heads, max_seq_len, head_dim]

CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")


def cache_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    return (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)


def cache_shardings(cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int) -> LayerKV:
    one = sharder.sharding(CACHE_AXES, cache_shape(cfg, batch, max_len), "kv cache")
    return LayerKV(one, one)


def init_cache(cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int, dtype) -> KVCache:
    """Zeros, created directly in their shards (batch on `data`, KV heads on `model`)."""
    shape = cache_shape(cfg, batch, max_len)

    @partial(jax.jit, out_shardings=cache_shardings(cfg, sharder, batch, max_len))
    def zeros():
        return LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    return zeros()


def write_at(cache: KVCache, new: KVCache, positions: jax.Array) -> KVCache:
    """Decode: row b's new k/v [layers, B, kv_heads, 1, D] goes to position positions[b], once per
    step after all layers ran (the layers only read the cache)."""
    rows = jnp.arange(positions.shape[0])

    def put(stored, fresh):
        # Two index arrays split by a slice: numpy rules put their axis first, [B, layers, ...].
        update = fresh[:, :, :, 0].transpose(1, 0, 2, 3).astype(stored.dtype)
        return stored.at[:, rows, :, positions].set(update)

    return LayerKV(put(cache.k, new.k), put(cache.v, new.v))
