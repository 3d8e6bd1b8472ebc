"""The KV cache: an explicit pytree, one (k, v) pair per layer, passed into and out of each step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from shardinfer.config import ModelConfig
from shardinfer.models.llama import LayerKV
from shardinfer.sharding import Sharder

KVCache = tuple[LayerKV, ...]  # per layer: k, v [batch, max_seq_len, kv_heads, head_dim]

CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")


def cache_shardings(cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int):
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    one = sharder.sharding(CACHE_AXES, shape, "kv cache")
    return tuple(LayerKV(one, one) for _ in range(cfg.num_layers))


def init_cache(cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int, dtype) -> KVCache:
    """Zeros, created directly in their shards (batch on `data`, KV heads on `model`)."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    shardings = cache_shardings(cfg, sharder, batch, max_len)

    @partial(jax.jit, out_shardings=shardings)
    def zeros():
        return tuple(
            LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)
        )

    return zeros()


def write_at(cache: KVCache, new: KVCache, positions: jax.Array) -> KVCache:
    """Decode: row b's single new k/v [B, 1, ...] goes to position positions[b]."""
    rows = jnp.arange(positions.shape[0])
    return tuple(
        LayerKV(c.k.at[rows, positions].set(n.k[:, 0]), c.v.at[rows, positions].set(n.v[:, 0]))
        for c, n in zip(cache, new, strict=True)
    )
