"""Weights in GGUF's block formats, kept as blocks in memory and multiplied as blocks.

A block is 32 consecutive values along the contracted (input) dimension with their own scale
(llama.cpp's layouts):
  q8_0: f16 d, int8 q[32]          w = d * q
  q4_0: f16 d, u8 q[16]            w = d * (nibble - 8)
  q4_1: f16 d, f16 m, u8 q[16]     w = d * nibble + m
where byte i of a 4-bit block holds element i in its low nibble and element i + 16 in its high
one. A `BlockWeight` stores the weight transposed, output axes first and the inputs flattened
(as GGUF rows are), as arrays `qs` [*N, prod(K) / 32, bytes], `d` (and `m`)
[*N, prod(K) / 32], the first output axis split over the mesh axis the rules give the weight
(BlockWeight.__init__ says why row-parallel weights are split along their output too).

The matmul runs per device inside `shard_map`: each device multiplies its own shard of output
rows against the whole input (the C++ kernels of shardinfer.kernels on x86-64 CPUs, the same
math in XLA elsewhere).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardinfer import kernels

BLOCK = 32
BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1")
_PAYLOAD = {"q8_0": BLOCK, "q4_0": BLOCK // 2, "q4_1": BLOCK // 2}  # bytes of q per block
_QS_DTYPE = {"q8_0": np.int8, "q4_0": np.uint8, "q4_1": np.uint8}

log = logging.getLogger("shardinfer")


# ---- block arrays on the host (numpy) or in jit (jnp) ----------------------------------------


def quantize_blocks(w, fmt: str):
    """w [..., K] (K a multiple of 32) -> (qs [..., K/32, bytes], d [..., K/32] float16,
    m or None), rounding as llama.cpp's reference quantizers do."""
    xp = jnp if isinstance(w, jax.Array) else np
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{fmt} needs rows that are a multiple of {BLOCK}; got {w.shape[-1]}")
    x = w.astype(xp.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    m = None
    if fmt == "q8_0":
        d = xp.max(xp.abs(x), axis=-1) / 127.0
        q = _round_away(x * _inverse(d, xp)[..., None], xp)
        return q.astype(xp.int8), d.astype(xp.float16), None
    if fmt == "q4_0":  # the value of largest magnitude maps to -8
        peak = xp.take_along_axis(x, xp.argmax(xp.abs(x), axis=-1)[..., None], axis=-1)[..., 0]
        d = peak / -8.0
        q = xp.floor(x * _inverse(d, xp)[..., None] + 8.5)
    elif fmt == "q4_1":
        low, high = xp.min(x, axis=-1), xp.max(x, axis=-1)
        d, m = (high - low) / 15.0, low
        q = xp.floor((x - low[..., None]) * _inverse(d, xp)[..., None] + 0.5)
    else:
        raise ValueError(f"unknown block format {fmt!r}; supported: {', '.join(BLOCK_FORMATS)}")
    q = xp.clip(q, 0, 15).astype(xp.uint8)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return packed, d.astype(xp.float16), None if m is None else m.astype(xp.float16)


def dequantize_blocks(qs, d, m, fmt: str, dtype=jnp.float32):
    """The inverse layout: (qs, d, m) -> values [..., K] in `dtype` (numpy or jnp)."""
    xp = jnp if isinstance(qs, jax.Array) else np
    if fmt == "q8_0":
        q = qs.astype(xp.float32)
    else:
        low, high = qs & 0x0F, qs >> 4
        q = xp.concatenate([low, high], axis=-1).astype(xp.float32)
        if fmt == "q4_0":
            q = q - 8.0
    w = q * d.astype(xp.float32)[..., None]
    if fmt == "q4_1":
        w = w + m.astype(xp.float32)[..., None]
    return w.reshape(*w.shape[:-2], -1).astype(dtype)


def _inverse(d, xp):
    return xp.where(d != 0, 1.0 / xp.where(d != 0, d, 1.0), 0.0)


def _round_away(x, xp):
    """Round half away from zero (C's roundf, as llama.cpp rounds), not numpy's half-to-even."""
    return xp.sign(x) * xp.floor(xp.abs(x) + 0.5)


# ---- the parameter ---------------------------------------------------------------------------


class BlockWeight(nnx.Module):
    """A matmul weight of our layout `shape` [*K, *N] (`contract` gives K; a leading "layers"
    axis stays first) held as blocks of `fmt`, output axes first (module docstring)."""

    def __init__(self, value, axes, contract, fmt: str, sharder):
        if fmt not in BLOCK_FORMATS:
            raise ValueError(f"unknown block format {fmt!r}; supported: {BLOCK_FORMATS}")
        self.fmt, self.sharder = fmt, sharder  # static: part of the graph, not the state
        lead = [i for i, a in enumerate(axes) if a == "layers"]
        n_idx = [i for i in range(len(axes)) if i not in contract and i not in lead]
        self.n_axes = tuple(axes[i] for i in n_idx)
        self.k_axes = tuple(axes[i] for i in contract)
        order = [*lead, *n_idx, *contract]
        outputs = [value.shape[i] for i in (*lead, *n_idx)]
        inputs = math.prod(value.shape[i] for i in contract)  # blocks run across all of K
        if inputs % BLOCK:
            raise ValueError(f"a {fmt} weight needs its inputs ({'x'.join(self.k_axes)}: "
                             f"{inputs}) to be a multiple of {BLOCK}")  # fmt: skip
        # Placement: only the first output axis is ever split. A row-parallel weight (its
        # input axis on a mesh axis) is split along its output instead: each device then
        # computes whole output elements, bit for bit as one device does, where partial sums
        # added over the mesh would differ in their last bits, and rounding the next layer's
        # activations to int8 blows last-bit differences up into different tokens.
        split = self.n_axes[0]
        if sharder.rules.mesh_axis(split) is None and sharder.rules.mesh_axis(self.k_axes[0]):
            split = self.k_axes[0]
        outer = ("layers",) * len(lead) + (split,) + (None,) * len(self.n_axes)
        qs, d, m = quantize_blocks(jnp.transpose(value, order).reshape(*outputs, inputs), fmt)
        self.qs = nnx.Param(qs, logical_axes=(*outer, None), block_format=fmt)
        self.d = nnx.Param(d, logical_axes=outer, block_format=fmt)
        # nnx.data: `m` is state even while None (a q4_1 reformat fills it in).
        self.m = nnx.data(nnx.Param(m, logical_axes=outer, block_format=fmt) if m is not None
                          else None)  # fmt: skip

    def reformat(self, fmt: str) -> None:
        """An abstract weight (shapes only, before loading) switched to another format."""
        blocks = self.d.get_value().shape
        self.fmt = fmt
        self.qs = self._abstract(self.qs, (*blocks, _PAYLOAD[fmt]), _QS_DTYPE[fmt], fmt)
        self.d = self._abstract(self.d, blocks, np.float16, fmt)
        self.m = nnx.data(self._abstract(self.d, blocks, np.float16, fmt) if fmt == "q4_1"
                          else None)  # fmt: skip

    @staticmethod
    def _abstract(like: nnx.Param, shape, dtype, fmt: str) -> nnx.Param:
        value = jax.ShapeDtypeStruct(shape, dtype)
        return nnx.Param(value, logical_axes=like.logical_axes, block_format=fmt)

    @property
    def arrays(self):
        return self.qs[...], self.d[...], None if self.m is None else self.m[...]


# ---- the matmul and the lookup ---------------------------------------------------------------


def block_dense(x: jax.Array, w: BlockWeight) -> jax.Array:
    """x [..., *K] @ w -> float32 [..., *N], per device on its shards."""
    return block_dense_many(x, [w])[0]


def can_share_x(ws) -> bool:
    """Whether `block_dense_many` takes these weights in one call: one format, the same input
    axes (so the same x), and a mesh that is the same object."""
    ws = list(ws)
    return (
        bool(ws)
        and all(isinstance(w, BlockWeight) for w in ws)
        and all(
            w.fmt == ws[0].fmt and w.k_axes == ws[0].k_axes and w.sharder is ws[0].sharder
            for w in ws
        )
    )


def block_dense_many(x: jax.Array, ws) -> list[jax.Array]:
    """x [..., *K] @ w for each weight (`can_share_x`) -> float32 [..., *N_w] each, per device
    on its shards, in one kernel call per device where the kernels serve (x rounded once for
    all of them); each result has the bits its weight gives alone."""
    ws = list(ws)
    if not can_share_x(ws):
        raise ValueError("block_dense_many needs block weights of one format and input axes")
    w0 = ws[0]
    k_dims = len(w0.k_axes)
    lead = x.shape[: x.ndim - k_dims]
    x2 = x.reshape(math.prod(lead), -1).astype(jnp.float32)
    mesh, rules = w0.sharder.mesh, w0.sharder.rules
    batch = rules.mesh_axis("batch")
    # Rows split over the batch's mesh axis only where the batch itself divides it, as the
    # activations around are: splitting the flattened rows of a batch that doesn't would cut
    # the sequence, and XLA would then run the attention after it on other shapes.
    splits = batch in mesh.shape and lead and lead[0] % mesh.shape[batch] == 0
    rows_axis = batch if splits else None
    # A sequence (prefill) takes the kernel's row-tiled path, one token a row (decode) the
    # other, whatever the number of rows: so a row's bits never depend on its batch.
    row_tiled = len(lead) >= 2 and lead[-1] > 1
    if _use_kernels(mesh):
        many = functools.partial(kernels.block_matmul_many, row_tiled=row_tiled)
    elif mesh.devices.flat[0].platform == "cpu":  # the kernels' bits, from XLA
        one = functools.partial(kernels.block_matmul_reference, row_tiled=row_tiled)
        many = None
    else:
        one, many = kernels.block_matmul_dequantized, None

    plans, arrays, specs, out_specs = [], [x2], [P(rows_axis, None)], []
    for w in ws:
        qs, d, m = w.arrays
        qs_spec = _padded(w.sharder.spec(w.qs.logical_axes[-qs.ndim :], qs.shape), qs.ndim)
        n_axis = qs_spec[0]  # the only axis a block weight is split on (BlockWeight.__init__)
        # A row-parallel weight split along its output (BlockWeight.__init__) gathers its
        # output whole on every device, as the float model's output is: left split, XLA would
        # reduce the next norm over the pieces and add them across devices, in another order
        # than one device does (and int8 rounding of the next activations makes that a
        # different token).
        gather = n_axis is not None and rules.mesh_axis(w.n_axes[0]) != n_axis
        own = [qs, d] + ([] if m is None else [m])
        plans.append((w, len(own), n_axis, gather, qs.shape[: len(w.n_axes)]))
        arrays += own
        specs += [P(*qs_spec)] + [P(*qs_spec[:-1])] * (len(own) - 1)
        out_specs.append(P(rows_axis, None if gather else n_axis))

    def local(x_loc, *own_arrays):
        weights, at = [], 0
        for w, count, _, _, _ in plans:
            qs_loc, *scales = own_arrays[at : at + count]
            at += count
            n = math.prod(qs_loc.shape[: len(w.n_axes)])
            scales = [s.reshape(n, -1) for s in scales] + [None] * (2 - len(scales))
            weights.append((qs_loc.reshape(n, -1, qs_loc.shape[-1]), *scales))
        if many is not None:
            ys = many(x_loc, weights, w0.fmt)
        else:
            ys = [one(x_loc, *wt, w0.fmt) for wt in weights]
        return [jax.lax.all_gather(y, n_axis, axis=1, tiled=True) if gather else y
                for y, (_, _, n_axis, gather, _) in zip(ys, plans, strict=True)]  # fmt: skip

    ys = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs,
                       check_vma=False)(*arrays)  # fmt: skip
    return [y.reshape(*lead, *plan[4]) for y, plan in zip(ys, plans, strict=True)]


def block_rows(w: BlockWeight, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of a (vocab, embed) block table, dequantized: the embedding lookup."""
    qs, d, m = w.arrays
    taken = [jnp.take(a, tokens, axis=0) for a in (qs, d)]
    m_rows = None if m is None else jnp.take(m, tokens, axis=0)
    return dequantize_blocks(*taken, m_rows, w.fmt, dtype)


def _padded(spec: P, ndim: int) -> tuple:
    return (*spec, *([None] * (ndim - len(spec))))


_said: set[str] = set()
_settings = {"kernels": True}


def use_kernels(enabled: bool) -> None:
    """Tests and benchmarks: `False` sends block matmuls through XLA even where the kernels
    loaded (programs traced before keep their path: `jax.clear_caches()` after)."""
    _settings["kernels"] = enabled


def _use_kernels(mesh) -> bool:
    """The compiled kernels serve CPU meshes when they loaded; otherwise XLA does the same
    math (said once per reason)."""
    platform = mesh.devices.flat[0].platform
    if platform == "cpu" and kernels.available() and _settings["kernels"]:
        return True
    if platform != "cpu":
        reason = "not a CPU mesh"
    elif not _settings["kernels"]:
        reason = "turned off"
    else:
        reason = f"no CPU kernels: {kernels.unavailable_reason()}"
    if reason not in _said:
        _said.add(reason)
        log.info("GGUF block weights: XLA matmuls (%s)", reason)
    return False
