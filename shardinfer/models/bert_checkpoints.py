"""The BERT family's checkpoints: the config.json reader and where each of our parameters lives
in a Hugging Face checkpoint.

Names are given without a prefix, as `BertModel` and sentence-transformers save them; a
checkpoint saved from a task model (`BertForMaskedLM`, ...) puts "bert." before each, which
the loader tries too (`HF_PREFIXES`). Hugging Face stores a Linear as [out, in]; we store
[in, heads, head_dim] (and the reverse for the output projection) so that einsum subscripts
spell the shapes. The transforms are numpy views, read only when a device's slice is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from shardinfer.models.bert import BertConfig
from shardinfer.weights.loader import TensorRef

HF_ARCHITECTURES = ("bert",)
HF_PREFIXES = ("", "bert.")


def config_from_hf(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> BertConfig:
    """config.json -> BertConfig (generation_config.json means nothing to an encoder)."""
    arch = raw.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {arch!r} in config.json ({', '.join(HF_ARCHITECTURES)})"
        )
    positions = raw.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(
            f"config.json sets position_embedding_type={positions!r}; only 'absolute' is supported"
        )
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise ValueError("config.json describes a BERT decoder; only encoders are supported")
    return BertConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        max_position_embeddings=raw.get("max_position_embeddings", 512),
        type_vocab_size=raw.get("type_vocab_size", 2),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
        hidden_act=raw.get("hidden_act", "gelu"),
        pad_token_id=raw.get("pad_token_id") or 0,
        checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def hf_tensor(path: tuple, cfg: BertConfig) -> TensorRef:
    """The checkpoint tensor behind the parameter at `path` (an nnx state path)."""
    e, m, h, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    top = {
        ("embeddings", "word"): ("word_embeddings.weight", (cfg.vocab_size, e), _same),
        ("embeddings", "position"): (
            "position_embeddings.weight",
            (cfg.max_position_embeddings, e),
            _same,
        ),
        ("embeddings", "token_type"): (
            "token_type_embeddings.weight",
            (cfg.type_vocab_size, e),
            _same,
        ),
        ("embeddings", "norm", "weight"): ("LayerNorm.weight", (e,), _same),
        ("embeddings", "norm", "bias"): ("LayerNorm.bias", (e,), _same),
    }
    if path in top:
        name, shape, fn = top[path]
        return TensorRef("embeddings." + name, shape, fn)
    if path[0] != "layers":
        raise KeyError(f"no checkpoint tensor is known for parameter {'.'.join(map(str, path))}")
    i, rest = path[1], path[2:]

    def heads_in(w: np.ndarray) -> np.ndarray:  # [H*D, E] -> [E, H, D]
        return w.reshape(h, d, e).transpose(2, 0, 1)

    def heads_out(w: np.ndarray) -> np.ndarray:  # [E, H*D] -> [H, D, E]
        return w.reshape(e, h, d).transpose(1, 2, 0)

    def per_head(b: np.ndarray) -> np.ndarray:
        return b.reshape(h, d)

    qkv: dict[str, tuple[str, tuple[int, ...], Callable]] = {}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        qkv[f"{ours}_proj"] = (f"attention.self.{theirs}.weight", (h * d, e), heads_in)
        qkv[f"{ours}_bias"] = (f"attention.self.{theirs}.bias", (h * d,), per_head)
    layer = {
        **{("attention", name): ref for name, ref in qkv.items()},
        ("attention", "o_proj"): ("attention.output.dense.weight", (e, h * d), heads_out),
        ("attention", "o_bias"): ("attention.output.dense.bias", (e,), _same),
        ("attention_norm", "weight"): ("attention.output.LayerNorm.weight", (e,), _same),
        ("attention_norm", "bias"): ("attention.output.LayerNorm.bias", (e,), _same),
        ("mlp", "up_proj"): ("intermediate.dense.weight", (m, e), _transpose),
        ("mlp", "up_bias"): ("intermediate.dense.bias", (m,), _same),
        ("mlp", "down_proj"): ("output.dense.weight", (e, m), _transpose),
        ("mlp", "down_bias"): ("output.dense.bias", (e,), _same),
        ("mlp_norm", "weight"): ("output.LayerNorm.weight", (e,), _same),
        ("mlp_norm", "bias"): ("output.LayerNorm.bias", (e,), _same),
    }
    if rest not in layer:
        raise KeyError(f"no checkpoint tensor is known for parameter {'.'.join(map(str, path))}")
    name, shape, fn = layer[rest]
    return TensorRef(f"encoder.layer.{i}.{name}", shape, fn)
