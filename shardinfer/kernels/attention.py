"""Attention as one CPU kernel call (attention.cc): a prompt's causal self-attention (prefill)
and a decode step's one query per row against the KV cache.

`prefill_attention(q, kt, v, positions, window)` is, for every batch row b, query row t and
query head h (kv head h // G, with G = H // KV query heads per kv head):

    out[b, t, h] = sum_s softmax_s(q[b, t, h] . kt[b, h // G, :, s]) * v[b, h // G, s]

over the keys s that t sees: ``positions[b, s] <= positions[b, t]`` and, with a sliding
`window`, ``positions[b, t] - positions[b, s] < window``. Shapes: q float32 [B, T, H, D]
(already scaled by 1/sqrt(D)), kt [B, KV, D, T] (the keys transposed, as the KV cache keeps
them), v [B, KV, T, D], positions int32 [B, T]; the result is float32 [B, T, H, D].

The kernel skips the key groups (32 keys) that no query of a tile sees, so a causal prompt
costs about half of the full score matrix, and each row's result depends only on its own
query, keys and values (the same bits in any batch and on any mesh). Against the XLA
formulation, `prefill_attention_reference`, it differs only in float rounding (its exp is
its own polynomial, its sums run in another order).

`decode_attention(q, kt, v, k_new, v_new, positions, window)` is one decode step: q float32
[B, H, D] (scaled), the cache's kt [B, KV, D, S] and v [B, KV, S, D] (slot s holds position s),
this step's k_new, v_new [B, KV, D] and positions int32 [B]. Row b attends the cache's slots
s < positions[b] (and, with a window, positions[b] - s < window) and its own new key, which
stands at slot positions[b]: the result is what `prefill_attention` gives the last row of the
whole sequence, to the bit, and nothing of the cache past a row's position is read (XLA's
formulation, `decode_attention_reference`, reads every slot). A row whose position is outside
[0, S) gets zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shardinfer import kernels

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "prefill_attention",
    "prefill_attention_reference",
    "supports",
]

_NEG_INF = -1e30


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim (a multiple of 64) and loaded on this machine."""
    return head_dim % 64 == 0 and kernels.available()


def _check(q, kt, v, positions, window: int | None) -> None:
    if q.ndim != 4 or kt.ndim != 4 or v.ndim != 4 or positions.ndim != 2:
        raise ValueError("q, kt, v must be 4-D and positions 2-D "
                         f"(got {q.shape}, {kt.shape}, {v.shape}, {positions.shape})")  # fmt: skip
    b, t, h, d = q.shape
    kv = kt.shape[1]
    if kv == 0 or h % kv:
        raise ValueError(f"{h} query heads do not divide into {kv} kv heads")
    if kt.shape != (b, kv, d, t) or v.shape != (b, kv, t, d) or positions.shape != (b, t):
        raise ValueError(f"shapes do not agree: q {q.shape}, kt {kt.shape} (want "
                         f"{(b, kv, d, t)}), v {v.shape}, positions {positions.shape}")  # fmt: skip
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive or None, not {window}")


def prefill_attention_reference(q, kt, v, positions, window: int | None = None) -> jax.Array:
    """The same attention in jnp (XLA), the full [T, T] scores masked: any platform."""
    _check(q, kt, v, positions, window)
    b, t, h, d = q.shape
    kv = kt.shape[1]
    qg = q.astype(jnp.float32).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bkds->bkgts", qg, kt.astype(jnp.float32))
    qpos, kpos = positions[:, :, None], positions[:, None, :]
    seen = kpos <= qpos
    if window is not None:
        seen &= qpos - kpos < window
    scores = jnp.where(seen[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d)


def prefill_attention(q, kt, v, positions, window: int | None = None) -> jax.Array:
    """The kernel on CPU devices where it loaded and takes the head_dim (`supports`), else
    `prefill_attention_reference`. Jit-able, and usable inside shard_map on local shards
    (batch rows and kv heads, with their query heads, may be split)."""
    _check(q, kt, v, positions, window)
    ops = (q.astype(jnp.float32), kt.astype(jnp.float32), v.astype(jnp.float32),
           positions.astype(jnp.int32))  # fmt: skip
    if not supports(q.shape[-1]):
        return prefill_attention_reference(*ops, window)

    def on_cpu(*ops):
        result = jax.ShapeDtypeStruct(ops[0].shape, jnp.float32)
        return kernels._ffi_call(kernels.ATTENTION_TARGET, result, ops,
                                 window=np.int32(window or 0))  # fmt: skip

    def elsewhere(*ops):
        return prefill_attention_reference(*ops, window)

    return jax.lax.platform_dependent(*ops, cpu=on_cpu, default=elsewhere)


def _check_decode(q, kt, v, k_new, v_new, positions, window: int | None) -> None:
    if (q.ndim, kt.ndim, v.ndim, k_new.ndim, v_new.ndim, positions.ndim) != (3, 4, 4, 3, 3, 1):
        raise ValueError(
            "q, kt, v, k_new, v_new, positions must be 3-, 4-, 4-, 3-, 3- and 1-D (got "
            f"{q.shape}, {kt.shape}, {v.shape}, {k_new.shape}, {v_new.shape}, {positions.shape})"
        )
    b, h, d = q.shape
    kv, s = kt.shape[1], kt.shape[3]
    if kv == 0 or h % kv:
        raise ValueError(f"{h} query heads do not divide into {kv} kv heads")
    if (kt.shape != (b, kv, d, s) or v.shape != (b, kv, s, d) or k_new.shape != (b, kv, d)
            or v_new.shape != (b, kv, d) or positions.shape != (b,)):  # fmt: skip
        raise ValueError(f"shapes do not agree: q {q.shape}, kt {kt.shape}, v {v.shape}, "
                         f"k_new {k_new.shape}, v_new {v_new.shape}, positions "
                         f"{positions.shape}")  # fmt: skip
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive or None, not {window}")


def decode_attention_reference(q, kt, v, k_new, v_new, positions, window: int | None = None):
    """The same decode step in jnp (XLA), over every slot of the cache: any platform."""
    _check_decode(q, kt, v, k_new, v_new, positions, window)
    b, h, d = q.shape
    kv, s = kt.shape[1], kt.shape[3]
    qg = q.astype(jnp.float32).reshape(b, kv, h // kv, d)
    cached = jnp.einsum("bkgd,bkds->bkgs", qg, kt.astype(jnp.float32))
    own = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(jnp.float32))[..., None]
    pos = positions[:, None]
    slot = jnp.arange(s)[None, :]
    seen = slot < pos
    if window is not None:
        seen &= pos - slot < window
    scores = jnp.concatenate([jnp.where(seen[:, None, None], cached, _NEG_INF), own], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs[..., :s], v.astype(jnp.float32))
    out = out + probs[..., s:] * v_new.astype(jnp.float32)[:, :, None]
    inside = (positions >= 0) & (positions < s)
    return jnp.where(inside[:, None, None, None], out, 0.0).reshape(b, h, d)


def decode_attention(q, kt, v, k_new, v_new, positions, window: int | None = None) -> jax.Array:
    """The decode kernel on CPU devices where it loaded and takes the head_dim (`supports`),
    else `decode_attention_reference`. Jit-able, and usable inside shard_map on local shards
    (batch rows and kv heads, with their query heads, may be split)."""
    _check_decode(q, kt, v, k_new, v_new, positions, window)
    ops = tuple(a.astype(jnp.float32) for a in (q, kt, v, k_new, v_new))
    ops += (positions.astype(jnp.int32),)
    if not supports(q.shape[-1]):
        return decode_attention_reference(*ops, window)

    def on_cpu(*ops):
        result = jax.ShapeDtypeStruct(ops[0].shape, jnp.float32)
        return kernels._ffi_call(kernels.DECODE_ATTENTION_TARGET, result, ops,
                                 window=np.int32(window or 0))  # fmt: skip

    def elsewhere(*ops):
        return decode_attention_reference(*ops, window)

    return jax.lax.platform_dependent(*ops, cpu=on_cpu, default=elsewhere)


def _set_isa(name: str | None) -> None:
    """Tests: run the kernel with "avx2" or "avx512" (None: the best this CPU has)."""
    lib = kernels._load()
    if lib is None:
        raise RuntimeError(kernels.unavailable_reason())
    code = lib.ShardinferAttentionBestIsa() if name is None else {"avx2": 1, "avx512": 2}.get(name)
    if code is None or not lib.ShardinferAttentionSetIsa(code):
        raise ValueError(f"instruction set {name!r} is not available on this CPU")


def _supported_isas() -> list[str]:
    lib = kernels._load()
    if lib is None:
        return []
    return ["avx2", "avx512"][: lib.ShardinferAttentionBestIsa()]
