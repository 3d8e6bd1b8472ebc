"""The KV cache: an explicit pytree passed into and out of each step.

Its form follows the model's layer loop: "scan" keeps one LayerKV whose arrays carry a leading
layers axis; "unrolled" keeps a list of per-layer LayerKVs (on XLA:CPU even a static slice of
one layer out of a stacked array is a copy). Keys are [..., batch, kv_heads, head_dim, seq] and
values [..., batch, kv_heads, seq, head_dim] (see LayerKV); every function here works on one
layer's arrays and is mapped over the layers of either form.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from shardinfer.config import ModelConfig
from shardinfer.models.interface import LayerKV
from shardinfer.sharding import Sharder

KVCache = LayerKV | list[LayerKV]

K_AXES = ("batch", "kv_heads", "head_dim", "seq")
V_AXES = ("batch", "kv_heads", "seq", "head_dim")


def _layer_shapes(cfg: ModelConfig, batch: int, max_len: int) -> LayerKV:
    k, d = cfg.num_kv_heads, cfg.head_dim
    return LayerKV((batch, k, d, max_len), (batch, k, max_len, d))


def cache_shardings(
    cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int, stacked: bool = True
) -> KVCache:
    shapes = _layer_shapes(cfg, batch, max_len)
    if stacked:
        lead, axes = (cfg.num_layers,), ("layers",)
    else:
        lead, axes = (), ()
    one = LayerKV(
        sharder.sharding(axes + K_AXES, lead + shapes.k, "kv cache keys"),
        sharder.sharding(axes + V_AXES, lead + shapes.v, "kv cache values"),
    )
    return one if stacked else [one] * cfg.num_layers


def cache_spec(
    cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int, dtype, stacked: bool = True
) -> KVCache:
    """The cache's shapes, dtypes and shardings, allocating nothing (to compile for it)."""
    shapes = _layer_shapes(cfg, batch, max_len)
    lead = (cfg.num_layers,) if stacked else ()

    def spec(shape, sharding):
        return jax.ShapeDtypeStruct(lead + shape, dtype, sharding=sharding)

    shardings = cache_shardings(cfg, sharder, batch, max_len, stacked)
    one = shardings if stacked else shardings[0]
    layer = LayerKV(spec(shapes.k, one.k), spec(shapes.v, one.v))
    return layer if stacked else [layer] * cfg.num_layers


def init_cache(
    cfg: ModelConfig, sharder: Sharder, batch: int, max_len: int, dtype, stacked: bool = True
) -> KVCache:
    """Zeros, created directly in their shards (batch on `data`, KV heads on `model`)."""
    spec = cache_spec(cfg, sharder, batch, max_len, dtype, stacked)

    @partial(jax.jit, out_shardings=jax.tree.map(lambda s: s.sharding, spec))
    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

    return zeros()


def map_layers(fn, cache: KVCache, *others: KVCache) -> KVCache:
    """fn(layer_cache, *layer_others) -> LayerKV, over the layers of either form."""
    if isinstance(cache, list):
        return [fn(*layers) for layers in zip(cache, *others, strict=True)]
    return jax.vmap(fn)(cache, *others)


def insert(cache: KVCache, new_kv: KVCache, slots) -> KVCache:
    """Copies prefilled k/v (R rows of T positions, laid out like the cache) row r into cache
    row slots[r], positions 0..T-1. A slot index past the end (a padding row) is dropped."""

    def one(layer: LayerKV, fresh: LayerKV) -> LayerKV:
        width = fresh.v.shape[2]
        k = layer.k.at[slots, :, :, :width].set(fresh.k.astype(layer.k.dtype), mode="drop")
        v = layer.v.at[slots, :, :width].set(fresh.v.astype(layer.v.dtype), mode="drop")
        return LayerKV(k, v)

    return map_layers(one, cache, new_kv)


def resize(cache: KVCache, length: int) -> KVCache:
    """The cache cut or zero-padded to `length` positions."""

    def fit(x, axis):
        if x.shape[axis] >= length:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    return map_layers(lambda layer: LayerKV(fit(layer.k, 3), fit(layer.v, 2)), cache)


def _per_shard(x: jax.Array, shards: int) -> jax.Array:
    """[slots, ...] -> [shards, slots_per_shard, ...]: rows are split over `data` in
    contiguous blocks, so each block is one device's (a reshape, no data moves)."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def _local(slots: jax.Array, shards: int, per_shard: int) -> jax.Array:
    """Global slot ids [B] (each shard's rows together) -> their indices inside the shard."""
    return slots.reshape(shards, -1) % per_shard


def gather_rows(cache: KVCache, slots: jax.Array, shards: int) -> KVCache:
    """The cache rows of `slots` (B ids, B / shards of them in each `data` shard, in shard
    order). The gather runs per shard (vmapped over the shard axis), so no shard reads
    another's rows: no collective."""

    def take(x):
        blocks = _per_shard(x, shards)
        picked = jax.vmap(lambda block, rows: block[rows])(
            blocks, _local(slots, shards, blocks.shape[1])
        )
        return picked.reshape(-1, *x.shape[1:])

    return map_layers(lambda layer: LayerKV(take(layer.k), take(layer.v)), cache)


def write_rows(cache: KVCache, new: KVCache, slots: jax.Array, positions: jax.Array,
               shards: int) -> KVCache:  # fmt: skip
    """Decode: row b's new k/v (one position) goes to cache row slots[b], position
    positions[b], once per step after all layers ran (the layers only read the cache).

    Per shard, like gather_rows, for the full bucket too: one scatter over the whole
    data-sharded cache was partitioned by XLA into an all-gather and a collective-permute per
    layer and per k/v (240 collectives a step for 30 layers; across processes each one a
    gloo round trip, and a 35% slower step even in one process)."""

    def one(layer: LayerKV, fresh: LayerKV) -> LayerKV:
        k_blocks, v_blocks = _per_shard(layer.k, shards), _per_shard(layer.v, shards)
        rows = _local(slots, shards, k_blocks.shape[1])
        pos = positions.reshape(shards, -1)
        fresh_k = _per_shard(fresh.k[..., 0].astype(layer.k.dtype), shards)  # [S, b, kv, D]
        fresh_v = _per_shard(fresh.v[:, :, 0].astype(layer.v.dtype), shards)
        k = jax.vmap(lambda c, r, p, n: c.at[r, :, :, p].set(n))(k_blocks, rows, pos, fresh_k)
        v = jax.vmap(lambda c, r, p, n: c.at[r, :, p].set(n))(v_blocks, rows, pos, fresh_v)
        return LayerKV(k.reshape(layer.k.shape), v.reshape(layer.v.shape))

    return map_layers(one, cache, new)
