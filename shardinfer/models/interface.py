"""What the engine and model.py rely on from a model family, and the KV cache's layout.

A family is a Flax NNX module plus its config dataclass (and checkpoint readers, see
models/registry.py). model.py builds it as `build(cfg, sharder, dtype, rngs, quantize,
layer_loop)`: with rngs=None under `nnx.eval_shape` for the abstract tree, with `nnx.Rngs` under
`jax.jit(out_shardings=...)` for random weights. Every parameter is an `nnx.Param` carrying
`logical_axes=` (or an Int8Weight from models/weights.py), so sharding.py can place it.

Parameters repeated per layer live under one top-level attribute named `layers`: with
layer_loop "scan" one module whose arrays have a leading `layers` axis, with "unrolled" an
`nnx.List` of per-layer modules. The loader (a stacked parameter is read layer by layer),
layer_forms.py (checkpoints are always stacked) and the cache's form rely on that name.

The cache is never module state: a decoder's `__call__` gets the cache (read only) and returns
this step's new keys and values; the engine (engine/kv_cache.py) owns, writes and donates it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

# How the layers run. "scan": one stacked module under lax.scan (compile time flat in depth;
# what accelerators want). "unrolled": one module per layer in a Python loop: XLA:CPU copies
# each layer's weights out of a stacked array every step (it cannot fuse the slice into the
# matmul), which cost ~35% of a batch-1 decode step.
LAYER_LOOPS = ("scan", "unrolled")


class LayerKV(NamedTuple):
    """One layer's keys and values (or, stacked, every layer's: a leading `layers` axis).

    Keys are stored transposed so both attention matmuls read the cache in the layout a plain
    matmul wants (q @ K and p @ V); otherwise XLA:CPU transposes the cache every step.
    Logical axes (engine/kv_cache.py): k ("batch", "kv_heads", "head_dim", "seq"),
    v ("batch", "kv_heads", "seq", "head_dim"), after "layers" when stacked.
    """

    k: jax.Array  # [layers, batch, kv_heads, head_dim, seq]; inside a layer, no `layers` axis
    v: jax.Array  # [layers, batch, kv_heads, seq, head_dim]


# The whole cache, and what a decoder returns as new_kv, in the form of its layer loop:
# "scan": one LayerKV of stacked arrays [L, ...]; "unrolled": a list of L per-layer LayerKVs.
# The new k/v of a step has the step's T tokens where the cache has `seq` positions.
KVCache = LayerKV | list[LayerKV]


class FamilyConfig(Protocol):
    """What model.py, the engine and the front ends read of any family's config (a frozen,
    hashable dataclass: it is a static part of jitted functions)."""

    architecture: str  # the registry key (models/registry.py `family_for`)
    vocab_size: int  # token ids are checked against it
    max_position_embeddings: int  # prompts and generations are capped by it
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]: ...  # what a shardinfer checkpoint stores

    # and a classmethod from_dict(data) -> config, which reads to_dict's output back


class DecoderConfig(FamilyConfig, Protocol):
    """A decoder's config also gives the cache's shapes (engine/kv_cache.py)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@runtime_checkable
class Decoder(Protocol):
    """A causal language model ("decoder" in the registry): what engine/engine.py and
    `Model.logits` call, on the module rebuilt inside a jitted function by `nnx.merge`."""

    layer_loop: str  # one of LAYER_LOOPS: the form of its `layers` and of the cache

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
        cache_len: int = 0,
    ) -> tuple[jax.Array, KVCache]:  # fmt: skip
        """tokens, positions int32 [B, T] -> final hidden states [B, T, E] and this step's new
        k/v for every layer (KVCache form, T positions).

        Without a cache (prefill, `Model.logits`): causal attention among the T tokens. With
        one (decode, T=1): row b also attends its cached positions < positions[b, 0]; only the
        first `cache_len` positions are read when cache_len is given (a static bound on every
        row's position). The cache is only read, never written."""
        ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, E] -> float32 logits [B, T, vocab]."""
        ...


@runtime_checkable
class Encoder(Protocol):
    """A bidirectional encoder ("encoder" in the registry, e.g. BERT for embeddings): no KV
    cache and no sampling, so the engine's decode loop never runs it; `Embedder` does. Its
    config also gives `hidden_size` (the vector width) and `pad_token_id` (what padding holds)."""

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens int32 [B, T] right-padded, lengths [B] -> hidden states [B, T, E], each row
        attending its own first lengths[b] tokens only."""
        ...
