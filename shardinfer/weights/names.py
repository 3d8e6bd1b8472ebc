"""Where each of our parameters lives in a Hugging Face checkpoint, and how to lay it out.

Hugging Face stores a Linear as [out, in]; we store [in, heads, head_dim] (and the reverse for
the output projection) so that einsum subscripts spell the shapes. The transforms below are numpy
views: on a memory-mapped file nothing is read until a device's slice is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from shardinfer.config import ModelConfig


class TensorRef(NamedTuple):
    name: str  # the Hugging Face tensor name
    shape: tuple[int, ...]  # its shape there
    to_ours: Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def hf_tensor(path: tuple, cfg: ModelConfig) -> TensorRef:
    """The checkpoint tensor behind the parameter at `path` (an nnx state path)."""
    e, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv, v = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    top = {
        ("embed_tokens",): TensorRef("model.embed_tokens.weight", (v, e), _same),
        ("lm_head",): TensorRef("lm_head.weight", (v, e), _same),
        ("norm", "weight"): TensorRef("model.norm.weight", (e,), _same),
    }
    if path in top:
        return top[path]
    if path[0] != "layers":
        raise KeyError(f"no checkpoint tensor is known for parameter {'.'.join(map(str, path))}")
    i, rest = path[1], path[2:]
    prefix = f"model.layers.{i}."

    def heads_in(n: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda w: w.reshape(n, d, e).transpose(2, 0, 1)

    def bias(n: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda b: b.reshape(n, d)

    layer = {
        ("input_layernorm", "weight"): ("input_layernorm.weight", (e,), _same),
        ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", (e,), _same),
        ("self_attn", "q_proj"): ("self_attn.q_proj.weight", (hq * d, e), heads_in(hq)),
        ("self_attn", "k_proj"): ("self_attn.k_proj.weight", (hkv * d, e), heads_in(hkv)),
        ("self_attn", "v_proj"): ("self_attn.v_proj.weight", (hkv * d, e), heads_in(hkv)),
        ("self_attn", "o_proj"): (
            "self_attn.o_proj.weight",
            (e, hq * d),
            lambda w: w.reshape(e, hq, d).transpose(1, 2, 0),
        ),
        ("self_attn", "q_bias"): ("self_attn.q_proj.bias", (hq * d,), bias(hq)),
        ("self_attn", "k_bias"): ("self_attn.k_proj.bias", (hkv * d,), bias(hkv)),
        ("self_attn", "v_bias"): ("self_attn.v_proj.bias", (hkv * d,), bias(hkv)),
        ("self_attn", "o_bias"): ("self_attn.o_proj.bias", (e,), _same),
        ("mlp", "gate_proj"): ("mlp.gate_proj.weight", (m, e), _transpose),
        ("mlp", "up_proj"): ("mlp.up_proj.weight", (m, e), _transpose),
        ("mlp", "down_proj"): ("mlp.down_proj.weight", (e, m), _transpose),
    }
    if rest not in layer:
        raise KeyError(f"no checkpoint tensor is known for parameter {'.'.join(map(str, path))}")
    name, shape, fn = layer[rest]
    return TensorRef(prefix + name, shape, fn)
