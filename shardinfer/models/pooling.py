"""Token states -> one vector per row, as sentence-transformers' Pooling and Normalize modules
compute them (sentence_transformers/sentence_transformer/modules/pooling.py).

Rows are right-padded: row b's real tokens are its first lengths[b]. Several modes give their
vectors concatenated in the order asked for, as sentence-transformers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shardinfer.weights.sentence_transformers import POOLING_MODES


def pool(
    hidden: jax.Array, lengths: jax.Array, modes: tuple[str, ...], normalize: bool
) -> jax.Array:
    """hidden [B, T, E], lengths int [B] -> float32 [B, E * len(modes)], L2-normalized when
    `normalize` (the Normalize module: x / max(|x|, 1e-12))."""
    x = hidden.astype(jnp.float32)
    t = x.shape[1]
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, T]
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)  # [B, 1]
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(x[:, 0])
        elif mode == "max":
            vectors.append(jnp.where(mask[..., None] > 0, x, -jnp.inf).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = jnp.einsum("bt,bte->be", mask, x)
            vectors.append(total / (count if mode == "mean" else jnp.sqrt(count)))
        elif mode == "weightedmean":  # position weights 1..T over the real tokens
            weights = mask * jnp.arange(1, t + 1, dtype=jnp.float32)[None, :]
            total = jnp.einsum("bt,bte->be", weights, x)
            vectors.append(total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9))
        elif mode == "lasttoken":
            last = jnp.maximum(lengths - 1, 0)
            vectors.append(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; supported: {POOLING_MODES}")
    out = jnp.concatenate(vectors, axis=-1)
    if normalize:
        norm = jnp.linalg.norm(out, axis=-1, keepdims=True)
        out = out / jnp.maximum(norm, 1e-12)
    return out
