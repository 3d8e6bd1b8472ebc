"""Attention as one CPU kernel per device, for models whose weights are GGUF blocks (the modes
that already run compiled kernels on CPU): the prompt's (prefill's) causal attention, and a
decode step's attention over the KV cache.

XLA's formulation (llama.py) materializes every layer's [T, T] scores, masks the future and
runs the softmax's reductions and exp over all of them: about half of a 512-token prefill of
SmolLM2 with block weights. The kernel (shardinfer/kernels/attention.py) skips what the mask
hides and gives each row the same bits whatever the batch or mesh, which the block modes
need (their next matmul rounds activations to int8 blocks, where a last-bit change can become
another token). In decode, XLA's formulation multiplies and reduces over every slot of the
cache's capacity (a third of a batch-32 step); the kernel reads each row's slots up to its
position, and gives the bits the prefill gives that row.
"""

from __future__ import annotations

import logging

import jax
from jax.sharding import PartitionSpec as P

from shardinfer.kernels import attention as kernel
from shardinfer.sharding import Sharder

log = logging.getLogger("shardinfer")

_settings = {"enabled": True}
_said: set[str] = set()


def use_kernel_attention(enabled: bool) -> None:
    """Tests and benchmarks: `False` sends the block modes' prefill and decode attention
    through XLA (as other modes) even where the kernel loaded; programs traced before keep
    their path."""
    _settings["enabled"] = enabled


def serves(sharder: Sharder | None, head_dim: int) -> bool:
    """Whether the kernel runs this model's prefill attention: a CPU mesh, the kernels loaded,
    a head_dim it takes (a multiple of 64), and not turned off."""
    if sharder is None or not _settings["enabled"]:
        return False
    if sharder.mesh.devices.flat[0].platform != "cpu":
        return False
    if kernel.supports(head_dim):
        return True
    reason = f"head_dim {head_dim}" if head_dim % 64 else "the CPU kernels did not load"
    if reason not in _said:
        _said.add(reason)
        log.info("prefill attention: XLA (%s)", reason)
    return False


def _split(sharder: Sharder, b: int, kv: int, h: int) -> tuple[str | None, str | None]:
    """The mesh axes of batch rows and of kv heads (with their query heads), each only where
    it divides, and not one axis for both."""
    mesh, rules = sharder.mesh, sharder.rules

    def axis_for(logical: str, size: int) -> str | None:
        axis = rules.mesh_axis(logical)
        return axis if axis in mesh.shape and size % mesh.shape[axis] == 0 else None

    rows = axis_for("batch", b)
    heads = axis_for("kv_heads", kv)
    if heads is not None and heads != axis_for("q_heads", h):
        heads = None  # query and kv heads must be split alike, or not at all
    if heads is not None and heads == rows:
        heads = None
    return rows, heads


def prefill_attention(q, kt, v, positions, window: int | None, sharder: Sharder) -> jax.Array:
    """q [B, T, H, D] (scaled), kt [B, KV, D, T], v [B, KV, T, D], positions [B, T] ->
    float32 [B, T, H, D], per device: batch rows over the batch's mesh axis and kv heads
    (with their query heads) over the heads' one, each only where it divides."""
    rows, heads = _split(sharder, q.shape[0], kt.shape[1], q.shape[2])

    def local(q, kt, v, positions):
        return kernel.prefill_attention(q, kt, v, positions, window)

    spec = P(rows, None, heads, None)
    kv_spec = P(rows, heads, None, None)
    in_specs = (spec, kv_spec, kv_spec, P(rows, None))
    return jax.shard_map(local, mesh=sharder.mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(q, kt, v, positions)  # fmt: skip


def decode_attention(q, kt, v, k_new, v_new, positions, window: int | None,
                     sharder: Sharder) -> jax.Array:  # fmt: skip
    """One decode step: q [B, H, D] (scaled), the cache's kt [B, KV, D, S] and v [B, KV, S, D],
    this step's k_new, v_new [B, KV, D], positions [B] -> float32 [B, H, D], split over the
    mesh as prefill_attention is."""
    rows, heads = _split(sharder, q.shape[0], kt.shape[1], q.shape[1])

    def local(*ops):
        return kernel.decode_attention(*ops, window)

    spec, new_spec = P(rows, heads, None), P(rows, heads, None)
    cache_spec = P(rows, heads, None, None)
    in_specs = (spec, cache_spec, cache_spec, new_spec, new_spec, P(rows))
    return jax.shard_map(local, mesh=sharder.mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(q, kt, v, k_new, v_new, positions)  # fmt: skip
