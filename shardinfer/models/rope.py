"""Rotary position embeddings, as Hugging Face computes them (rotate-half layout)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from shardinfer.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32, with Llama 3.1-style or linear scaling applied."""
    dim, scaling = config.head_dim, config.rope_scaling
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64) / dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(between, blended, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, head_dim] in float32.

    For a prompt (T > 1) the tables are made once, in memory: left to itself XLA fused cos and
    sin into every layer's RoPE of q and of k, so each (position, frequency) was recomputed
    once per head per layer (a 512-token prefill of SmolLM2 spent ~25 ms there)."""

    def tables(positions):
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    if positions.ndim != 2 or positions.shape[1] <= 1:
        return tables(positions)
    return _in_memory(tables, positions)


def _in_memory(fn, positions):
    """fn(positions), computed where nothing after can fuse into it: XLA fuses through an
    optimization barrier, but not out of a while loop whose trip count it cannot see. It runs
    once (twice, to the same result, if positions[0, 0] is -1234567)."""
    out = jax.eval_shape(fn, positions)
    trips = 1 + (positions[0, 0] == -1234567).astype(jnp.int32)

    def body(carry):
        return carry[0] + 1, fn(positions)

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out)
    return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), zeros))[1]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim]; cos/sin [B, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
