"""Sampling parameters (OpenAI names) and on-device sampling with per-row settings.

Each row carries its own temperature, top-k, top-p and seed, so greedy and sampled requests share
one decode step. A row's random key depends only on its seed and the position of the token being
drawn, so a seeded request gives the same tokens whatever batch or slot it runs in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shardinfer.engine.params import SamplingArrays, SamplingParams

__all__ = ["SamplingArrays", "SamplingParams", "sample"]


def _bisect(predicate, lo, hi, iterations: int = 40):
    """Per row, the largest t in [lo, hi] with predicate(t) true (predicate(lo) must hold and
    be monotone: true below some value, false above it)."""

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = predicate(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iterations, step, (lo, hi))[0]


def _filter_top_k_top_p(scaled, top_k, top_p):
    """Masks logits outside each row's top-k, then outside its top-p nucleus (vLLM's order).

    Thresholds are found by bisection on values instead of sorting the vocabulary: 40 passes
    of compare-and-sum cost far less than a sort, and over a vocabulary sharded on `model`
    each pass needs only a small all-reduce, where a sort would gather the whole row.
    """
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    lo = jnp.min(scaled, axis=-1, keepdims=True)
    hi = jnp.max(scaled, axis=-1, keepdims=True)
    # The k-th largest value: the largest t with at least k logits >= t.
    kth = _bisect(lambda t: jnp.sum(scaled >= t, axis=-1, keepdims=True) >= k, lo, hi)
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    # The smallest set of most likely tokens holding top_p of the mass: keep p >= the largest
    # t whose tokens (those with p >= t) still hold at least top_p.
    mass = lambda t: jnp.sum(jnp.where(probs >= t, probs, 0.0), -1, keepdims=True)  # noqa: E731
    floor = _bisect(
        lambda t: mass(t) >= top_p[:, None] * (1 - 1e-6),
        jnp.zeros_like(hi),
        jnp.max(probs, axis=-1, keepdims=True),
    )
    keep = (probs >= floor) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, scaled, -jnp.inf)


def sample(logits, positions, temperature, top_k, top_p, seed):
    """logits [B, V] float32 -> token ids [B] int32; `positions` [B] index of the drawn token."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        scaled = jax.lax.cond(
            needs_filter, _filter_top_k_top_p, lambda s, *_: s, scaled, top_k, top_p
        )
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # Random draws over the whole vocabulary cost more than the argmax: skip them when every
    # row is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, logits)
