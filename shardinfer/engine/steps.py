"""The pure, jitted device steps: prefill a padded batch, and one decode step for every row.

Both take the parameters, the cache and host arrays, return the sampled tokens and the new
cache, and donate the old cache so XLA updates it in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shardinfer.engine.kv_cache import KVCache, write_at, write_prefix
from shardinfer.engine.sampling import sample


def prefill_logits(graphdef, state, cache: KVCache, tokens, lengths):
    """tokens [B, T] right-padded; lengths [B]. Logits [B, V] at each row's last prompt token."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, new_kv = model(tokens, positions)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    return model.logits(last)[:, 0], write_prefix(cache, new_kv)


def decode_logits(graphdef, state, cache: KVCache, tokens, positions):
    """tokens [B] at positions [B] -> logits [B, V] for the token after each; cache updated."""
    model = nnx.merge(graphdef, state)
    hidden, new_kv = model(tokens[:, None], positions[:, None], cache)
    return model.logits(hidden)[:, 0], write_at(cache, new_kv, positions)


def prefill_step(graphdef, state, cache, tokens, lengths, sampling):
    logits, cache = prefill_logits(graphdef, state, cache, tokens, lengths)
    return sample(logits, lengths, *sampling), cache


def decode_step(graphdef, state, cache, tokens, positions, sampling):
    logits, cache = decode_logits(graphdef, state, cache, tokens, positions)
    return sample(logits, positions + 1, *sampling), cache


def jit_steps(graphdef):
    """Compiled once per (batch, bucket) shape; the graph definition is static."""
    donate = {"donate_argnums": (1,)}
    prefill = jax.jit(lambda s, c, t, n, p: prefill_step(graphdef, s, c, t, n, p), **donate)
    decode = jax.jit(lambda s, c, t, q, p: decode_step(graphdef, s, c, t, q, p), **donate)
    return prefill, decode
