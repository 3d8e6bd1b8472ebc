"""The Llama decoder family (Llama 2/3, Mistral, Qwen2, SmolLM2) as Flax NNX modules.

Every parameter carries logical axis names (`logical_axes=`), which sharding.py maps onto the
mesh. The module follows the Decoder interface (models/interface.py, where the cache layout
is stated); its checkpoint names and config readers are in llama_checkpoints.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from shardinfer.config import ModelConfig
from shardinfer.models import kernel_attention
from shardinfer.models.interface import LAYER_LOOPS, KVCache, LayerKV
from shardinfer.models.rope import apply_rope, inverse_frequencies, rope_tables
from shardinfer.models.weights import (
    BLOCK_MODES,
    dense,
    dense_many,
    dense_transposed,
    einsum_f32,
    embed_rows,
    stacked,
    weight,
)
from shardinfer.sharding import Sharder

NEG_INF = -1e30


def _zeros(shape, axes, dtype, layers: int | None) -> nnx.Param:
    shape, axes, _ = stacked(layers, shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, layers: int | None = None):
        shape, axes, _ = stacked(layers, (dim,), ("embed",))
        self.weight = nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs, quantize, layers: int | None = None,
                 sharder: Sharder | None = None):  # fmt: skip
        e, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_axes, kv_axes = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        common = (dtype, quantize, layers, sharder)
        self.q_proj = weight(rngs, (e, hq, d), q_axes, (0,), *common)
        self.k_proj = weight(rngs, (e, hkv, d), kv_axes, (0,), *common)
        self.v_proj = weight(rngs, (e, hkv, d), kv_axes, (0,), *common)
        o_axes = ("q_heads", "head_dim", "embed")
        self.o_proj = weight(rngs, (hq, d, e), o_axes, (0, 1), *common)
        if cfg.qkv_bias:
            self.q_bias = _zeros((hq, d), ("q_heads", "head_dim"), dtype, layers)
            self.k_bias = _zeros((hkv, d), ("kv_heads", "head_dim"), dtype, layers)
            self.v_bias = _zeros((hkv, d), ("kv_heads", "head_dim"), dtype, layers)
        if cfg.o_bias:
            self.o_bias = _zeros((e,), ("embed",), dtype, layers)
        self.cfg = cfg
        # Block-weight modes run their prefill attention as a CPU kernel where it serves
        # (kernel_attention.py): static, part of the graph.
        self.attention_sharder = sharder if quantize in BLOCK_MODES else None

    def __call__(self, x, positions, rope, cache: LayerKV | None):
        """x [B, T, E]. Without a cache: causal attention among these T tokens. With a cache
        (decode): each row attends its cached keys before positions[:, 0], then itself.
        Returns the output and this step's k/v laid out like the cache (see LayerKV)."""
        cfg = self.cfg
        q, k, v = dense_many(x, (self.q_proj, self.k_proj, self.v_proj))
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        b, t, hq, d = q.shape
        groups = hq // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, d) * (d**-0.5)
        # Scores [B, kv_heads, groups, T, S] and the softmax in float32 whatever the compute
        # dtype.
        if cache is None and kernel_attention.serves(self.attention_sharder, d):
            kt = k.transpose(0, 1, 3, 2)
            out = kernel_attention.prefill_attention(
                q.reshape(b, t, hq, d), kt, v, positions, cfg.sliding_window,
                self.attention_sharder)  # fmt: skip
            out = dense(out.astype(v.dtype), self.o_proj, contract=2)
            if cfg.o_bias:
                out = out + self.o_bias[...]
            return out, LayerKV(kt, v)
        if cache is None:
            # Queries ordered [B, kv, groups * T, D] first (a copy of q, small beside the
            # scores): each kv head is then one plain matmul whose scores come out in the
            # order the softmax reads, with no copy of the [.., T, S] scores between.
            q_rows = q.transpose(0, 2, 3, 1, 4).reshape(b, cfg.num_kv_heads, groups * t, d)
            scores = einsum_f32("bkmd,bksd->bkms", q_rows, k).reshape(b, -1, groups, t, t)
            allowed = _visible(positions[:, :, None], positions[:, None, :], cfg.sliding_window)
            probs = _softmax(jnp.where(allowed[:, None, None], scores, NEG_INF))
            probs = probs.astype(v.dtype).reshape(b, -1, groups * t, t)
            out = einsum_f32("bkms,bksd->bkmd", probs, v).reshape(b, -1, groups, t, d)
        elif t == 1 and cache.k.dtype == jnp.float32 and kernel_attention.serves(
                self.attention_sharder, d):  # fmt: skip
            # Decode on the kernel: it reads each row's cache only up to its position.
            out = kernel_attention.decode_attention(
                q.reshape(b, hq, d), cache.k, cache.v, k[:, :, 0], v[:, :, 0], positions[:, 0],
                cfg.sliding_window, self.attention_sharder)  # fmt: skip
            out = dense(out.astype(v.dtype).reshape(b, t, hq, d), self.o_proj, contract=2)
            if cfg.o_bias:
                out = out + self.o_bias[...]
            return out, LayerKV(k.transpose(0, 1, 3, 2), v)
        else:
            scores = einsum_f32("btkgd,bksd->bkgts", q, k)
            out = _attend_cache(q, scores, v, cache, positions, cfg.sliding_window)
        out = out.astype(v.dtype)  # [B, kv, groups, T, D]
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
        out = dense(out, self.o_proj, contract=2)
        if cfg.o_bias:
            out = out + self.o_bias[...]
        return out, LayerKV(k.transpose(0, 1, 3, 2), v)


# Decode (one query per row) on CPU: a multiply and a sum over a non-minor axis, so the cache's
# positions (scores) or its head_dim (values) stay the vector lanes. XLA:CPU's batched dots
# took 2-4x longer at these shapes (15 vs 8 us a layer at batch 1, 890 vs 330 at batch 32,
# 128 positions), and needed a transposed copy of the K cache first.
def _cached_scores(q, k_cache):
    """q [B, T, kv, g, D] against the cache's keys [B, kv, D, S] -> [B, kv, g, T, S] float32."""
    if q.shape[1] != 1 or jax.default_backend() != "cpu":
        return einsum_f32("btkgd,bkds->bkgts", q, k_cache)
    product = q[:, 0, :, :, :, None].astype(jnp.float32) * k_cache[:, :, None].astype(jnp.float32)
    return product.sum(axis=-2)[:, :, :, None, :]


def _weighted_values(p, values):
    """Softmax weights [B, kv, g, T, S] times values [B, kv, S, D] -> [B, kv, g, T, D] f32."""
    if p.shape[3] != 1 or jax.default_backend() != "cpu":
        return einsum_f32("bkgts,bksd->bkgtd", p, values)
    product = p[:, :, :, 0, :, None].astype(jnp.float32) * values[:, :, None].astype(jnp.float32)
    return product.sum(axis=-2)[:, :, :, None, :]


def _softmax(scores):
    top = scores.max(-1, keepdims=True)
    exps = jnp.exp(scores - top)
    return exps / exps.sum(-1, keepdims=True)  # normalized before any cast, as jax.nn does


def _attend_cache(q, own_scores, own_values, cache: LayerKV, positions, window: int | None):
    """Decode: each row's one query against its cached keys before positions[:, 0] and its
    own key (own_scores [B, kv, g, 1, 1]) -> [B, kv, g, 1, D] float32.

    The own score is put into the cached scores at the row's position (the cache has room
    for it: the step's k/v are written there after), so one softmax covers all S positions.
    Two blocks (S and 1) would copy nothing either, but the 1-block's exp runs on B * heads
    values, and XLA:CPU's exp differs in the last bit between its vector loop and its tail:
    a row's result would then depend on how many rows share the step. Over S (a multiple of
    the vector width) every value takes the vector loop, whatever the batch."""
    cached = _cached_scores(q, cache.k)
    slot_pos = jnp.arange(cache.v.shape[2])[None, None, :]
    own = (slot_pos == positions[:, :1, None])[:, None, None]  # [B, 1, 1, 1, S]
    seen = slot_pos < positions[:, :1, None]  # only what earlier steps wrote
    seen &= _visible(positions[:, :, None], slot_pos, window)
    probs = _softmax(jnp.where(own, own_scores, jnp.where(seen[:, None, None], cached, NEG_INF)))
    own_probs = jnp.sum(jnp.where(own, probs, 0.0), axis=-1, keepdims=True)
    dtype = own_values.dtype
    return _weighted_values(jnp.where(own, 0.0, probs).astype(dtype), cache.v) + (
        _weighted_values(own_probs.astype(dtype), own_values)
    )


def _visible(q_pos, k_pos, window: int | None):
    ok = k_pos <= q_pos
    if window is not None:
        ok &= q_pos - k_pos < window
    return ok


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs, quantize, layers: int | None = None,
                 sharder: Sharder | None = None):  # fmt: skip
        e, m = cfg.hidden_size, cfg.intermediate_size
        common = (dtype, quantize, layers, sharder)
        self.gate_proj = weight(rngs, (e, m), ("embed", "mlp"), (0,), *common)
        self.up_proj = weight(rngs, (e, m), ("embed", "mlp"), (0,), *common)
        self.down_proj = weight(rngs, (m, e), ("mlp", "embed"), (0,), *common)

    def __call__(self, x):
        gate, up = dense_many(x, (self.gate_proj, self.up_proj))
        return dense(jax.nn.silu(gate) * up, self.down_proj)


class Block(nnx.Module):
    """One decoder layer; built with `layers=L`, its parameters hold all L layers stacked."""

    def __init__(self, cfg: ModelConfig, dtype, rngs, quantize, layers: int | None = None,
                 sharder: Sharder | None = None):  # fmt: skip
        e, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(e, eps, dtype, layers)
        self.self_attn = Attention(cfg, dtype, rngs, quantize, layers, sharder)
        self.post_attention_layernorm = RMSNorm(e, eps, dtype, layers)
        self.mlp = MLP(cfg, dtype, rngs, quantize, layers, sharder)

    def __call__(self, x, positions, rope, cache):
        with jax.named_scope("attention"):
            attn, kv = self.self_attn(self.input_layernorm(x), positions, rope, cache)
        x = x + attn
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef, params, x, positions, rope, cache):
    """One unrolled layer. Every layer has the same graphdef and shapes, so this is traced and
    lowered once and called L times (XLA inlines the calls, so the compiled program is the
    same as a loop written out): a start no longer traces L copies of a layer (~25 ms each)."""
    return nnx.merge(graphdef, params)(x, positions, rope, cache)


class Llama(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        sharder: Sharder,
        dtype,
        rngs: nnx.Rngs | None,
        quantize: str | None = None,
        layer_loop: str = "scan",
    ):
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"unknown layer_loop {layer_loop!r}; use one of {LAYER_LOOPS}")
        self.cfg, self.sharder, self.dtype, self.layer_loop = cfg, sharder, dtype, layer_loop
        table = ((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), (1,), dtype, quantize, None,
                 sharder)  # fmt: skip
        self.embed_tokens = weight(rngs, *table)
        if layer_loop == "scan":
            self.layers = Block(cfg, dtype, rngs, quantize, cfg.num_layers, sharder)
        else:
            self.layers = nnx.List(
                [Block(cfg, dtype, rngs, quantize, None, sharder) for _ in range(cfg.num_layers)]
            )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = weight(rngs, *table)

    def __call__(self, tokens, positions, cache: KVCache | None = None, cache_len: int = 0):
        """tokens, positions [B, T] -> final hidden states [B, T, E] and every layer's new k/v
        (LayerKV layout with T for seq). The cache is only read here, and only its first
        `cache_len` positions when that is given (a static bound on every row's position)."""
        edge = ("batch", "seq", "embed")
        x = self.sharder.constrain(embed_rows(self.embed_tokens, tokens, self.dtype), edge)
        rope = rope_tables(positions, inverse_frequencies(self.cfg))

        def visible_cache(layer_cache):
            if layer_cache is None or not cache_len:
                return layer_cache
            return LayerKV(layer_cache.k[..., :cache_len], layer_cache.v[:, :, :cache_len])

        if self.layer_loop == "unrolled":  # the cache and the new k/v: one LayerKV per layer
            new_kv = []
            for i, block in enumerate(self.layers):
                layer_cache = None if cache is None else cache[i]
                graphdef, params = nnx.split(block)
                x, kv = _run_block(graphdef, params, x, positions, rope, visible_cache(layer_cache))
                x = self.sharder.constrain(x, edge)
                new_kv.append(kv)
            return self.norm(x), new_kv

        graphdef, params = nnx.split(self.layers)

        def layer_step(x, per_layer):
            layer_params, layer_cache = per_layer
            block = nnx.merge(graphdef, layer_params)
            x, kv = block(x, positions, rope, visible_cache(layer_cache))
            return self.sharder.constrain(x, edge), kv

        x, new_kv = jax.lax.scan(layer_step, x, (params, cache))
        return self.norm(x), new_kv

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, E] -> float32 logits [B, T, vocab], against the (vocab, embed) table."""
        table = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        logits = dense_transposed(hidden, table, out_dtype=jnp.float32)
        return self.sharder.constrain(logits, ("batch", "seq", "vocab"))
