"""Weight parameters, plain or int8-quantized, and the matmuls that read them.

An int8 weight keeps one float32 scale per output channel (per slice along the axes that are
not contracted), sharded like the output: w ~= q * scale. On accelerators the matmul upcasts
the int8 values inside the fused dot and scales the (much smaller) output; on CPU, and for
"w8a8" everywhere, the input is quantized per row and the dot runs int8 x int8 -> int32
(`int8_matmul`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardinfer.models.blocks import (
    BlockWeight,
    block_dense,
    block_dense_many,
    block_rows,
    can_share_x,
)

# "int8": int8 weights, float activations (the weight is upcast inside the matmul).
# "w8a8": the same int8 weights, and activations quantized per token: int8 x int8 dots.
# "q8_0", "q4_0": GGUF's block formats (models/blocks.py), made from any checkpoint; "gguf": a
# GGUF file's blocks as they are (each tensor in its file's format; float ones become q8_0).
QUANTIZE_MODES = (None, "int8", "w8a8", "gguf", "q8_0", "q4_0")
INT8_MODES = ("int8", "w8a8")
BLOCK_MODES = ("gguf", "q8_0", "q4_0")


def quantize_int8(w, contract: tuple[int, ...]):
    """Symmetric per-output-channel int8: returns (q int8, scale float32 of the kept axes)."""
    xp = jnp if isinstance(w, jax.Array) else np
    absmax = xp.max(xp.abs(w.astype(xp.float32)), axis=contract, keepdims=True)
    scale = xp.where(absmax > 0, absmax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
    return q, xp.squeeze(scale, axis=contract)


class Int8Weight(nnx.Module):
    def __init__(
        self, value, axes: tuple[str, ...], contract: tuple[int, ...], int8_activations=False
    ):
        self.int8_activations = int8_activations  # static: part of the graph, not the state
        q, scale = quantize_int8(value, contract)
        kept = tuple(a for i, a in enumerate(axes) if i not in contract)
        self.q = nnx.Param(q, logical_axes=axes, contract=contract)
        self.scale = nnx.Param(scale, logical_axes=kept, contract=contract)


def stacked(layers: int | None, shape, axes, contract=()):
    """With `layers`, one array for all layers: a leading "layers" axis (which lax.scan slices)."""
    if layers is None:
        return tuple(shape), tuple(axes), tuple(contract)
    return (layers, *shape), ("layers", *axes), tuple(c + 1 for c in contract)


def weight(
    rngs: nnx.Rngs | None,
    shape,
    axes,
    contract,
    dtype,
    quantize: str | None,
    layers: int | None = None,
    sharder=None,
):
    """A matmul weight of `shape` whose `contract` axes are summed over in use (stacked over
    `layers` when given).

    Random normal values (std 0.02), or zeros when rngs is None (abstract shapes: cheaper to
    trace). Block formats need the `sharder`: their matmul runs per device (shard_map). Under
    "gguf" each weight starts as q8_0 and model.py gives it its file's format.
    """
    shape, axes, contract = stacked(layers, shape, axes, contract)
    if rngs is None:
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    if quantize in INT8_MODES:
        return Int8Weight(value, axes, contract, int8_activations=quantize == "w8a8")
    if quantize in BLOCK_MODES:
        if sharder is None:
            raise ValueError(f"quantize={quantize!r} weights need the model's sharder")
        return BlockWeight(value, axes, contract, "q8_0" if quantize == "gguf" else quantize,
                           sharder)  # fmt: skip
    if quantize is not None:
        raise ValueError(f"unknown quantize mode {quantize!r}; supported: "
                         f"{', '.join(m for m in QUANTIZE_MODES if m)}")  # fmt: skip
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def dense(x: jax.Array, w, contract: int = 1, out_dtype=None) -> jax.Array:
    """x [..., *K] @ w [*K, *N] -> [..., *N], where K is w's first `contract` axes: one 2-D
    matmul over the flattened K and N (a plain or an int8 weight).

    Flattening is a free reshape of row-major arrays; an einsum over several axes instead let
    XLA:CPU transpose whole weights (o_proj) every step. Products accumulate in float32 whatever
    the compute dtype (XLA:CPU would otherwise sum bfloat16 in bfloat16, and greedy text drifts
    from float32 within a few tokens)."""
    if isinstance(w, BlockWeight):
        if contract != len(w.k_axes):
            raise ValueError(f"dense over {contract} axes of a weight that contracts "
                             f"{len(w.k_axes)}")  # fmt: skip
        return block_dense(x, w).astype(out_dtype or x.dtype)
    values = w.q[...] if isinstance(w, Int8Weight) else w[...]
    k_shape, n_shape = values.shape[:contract], values.shape[contract:]
    lead = x.shape[: x.ndim - contract]
    x2 = x.reshape(*lead, math.prod(k_shape))
    w2 = values.reshape(math.prod(k_shape), math.prod(n_shape))
    y = _matmul_f32(x2, w, w2, transposed=False)
    return y.astype(out_dtype or x.dtype).reshape(*lead, *n_shape)


def dense_many(x: jax.Array, ws, out_dtype=None) -> list[jax.Array]:
    """`dense` of one x against several weights (a layer's q, k, v; its gate and up): block
    weights of one format go in one kernel call (x rounded once for all), others one by one.
    Each result is what `dense` gives for that weight."""
    ws = list(ws)
    if len(ws) > 1 and can_share_x(ws):
        return [y.astype(out_dtype or x.dtype) for y in block_dense_many(x, ws)]
    return [dense(x, w, out_dtype=out_dtype) for w in ws]


def dense_transposed(x: jax.Array, w, out_dtype=None) -> jax.Array:
    """x [..., E] against a (rows, E) table -> [..., rows]: the tied or untied lm_head."""
    if isinstance(w, BlockWeight):  # stored (rows, E) already: output axes first
        return block_dense(x, w).astype(out_dtype or x.dtype)
    values = w.q[...] if isinstance(w, Int8Weight) else w[...]
    return _matmul_f32(x, w, values, transposed=True).astype(out_dtype or x.dtype)


def _matmul_f32(x: jax.Array, w, values: jax.Array, transposed: bool) -> jax.Array:
    """x [..., K] against w's 2-D `values` [K, N] ([N, K] when transposed) -> float32 [..., N],
    times the per-output scale of an int8 weight."""
    digits = _activation_digits(w)
    if digits:
        flat = int8_matmul(x.reshape(-1, x.shape[-1]), values, transposed, digits)
        y = flat.reshape(*x.shape[:-1], -1)
    else:
        dims = (((x.ndim - 1,), (1 if transposed else 0,)), ((), ()))
        y = jax.lax.dot_general(x, values.astype(x.dtype), dims,
                                preferred_element_type=jnp.float32)  # fmt: skip
    if isinstance(w, Int8Weight):
        y = y * w.scale[...].reshape(-1)
    return y


def _activation_digits(w) -> int:
    """In how many int8 digits per token an int8 weight's matmul takes its input: 0 for a
    float matmul on the upcast weight (accelerators fuse the upcast into the dot, and any
    float weight), 1 for w8a8, 2 for int8 on CPU (~1.5e-5 of the row's largest value, close to
    float32). XLA:CPU does not fuse the upcast, and a separate pass over the weights made
    int8 decode ~8x slower than float32."""
    if not isinstance(w, Int8Weight):
        return 0
    if w.int8_activations:
        return 1
    return 2 if jax.default_backend() == "cpu" else 0


def int8_matmul(x: jax.Array, q: jax.Array, transposed: bool = False, digits: int = 1) -> jax.Array:
    """x [M, K] float against int8 q [K, N] (or [N, K] when transposed) -> float32 [M, N] in
    int8 x int8 -> int32: x is quantized per row (symmetric, dynamic), the output rescaled.

    With digits=2, the rounding error of x is quantized too (a second int8 digit, 254 steps
    per step of the first) and goes through the same dot as extra rows: x is then carried to
    ~1.5e-5 of its row's largest value, close to float32 activations, for twice the rows.

    On this project's AVX2 CPU the int8 dot is ~1.5x faster than float32 from 8 rows on, but
    XLA:CPU runs a single row through a path ~10x slower, hence at least 2 rows."""
    rows = x.shape[0]
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    coarse = jnp.round(x / scale)
    parts = [coarse]
    if digits == 2:
        parts.append(jnp.round((x / scale - coarse) * 254.0))
    elif rows == 1:
        parts.append(jnp.zeros_like(coarse))
    xq = jnp.concatenate(parts, axis=0).astype(jnp.int8)
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    y = jax.lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    if digits == 2:
        return (y[:rows] + y[rows:] * (1.0 / 254.0)) * scale
    return y[:rows] * scale


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulating in float32 (the attention's batched matmuls).

    XLA:CPU has no batched bfloat16 x bfloat16 -> float32 dot ("Unsupported element type for
    DotThunk"), so there the operands are upcast first: exact, as a product of two bfloat16
    values fits in float32, so only the summation order can differ."""
    if jax.default_backend() == "cpu":
        a, b = (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in (a, b))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def embed_rows(w, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of a (vocab, embed) table: the embedding lookup."""
    if isinstance(w, BlockWeight):
        return block_rows(w, tokens, dtype)
    if isinstance(w, Int8Weight):
        rows = jnp.take(w.q[...], tokens, axis=0).astype(dtype)
        return rows * jnp.take(w.scale[...], tokens, axis=0)[..., None].astype(dtype)
    return jnp.take(w[...], tokens, axis=0)
