"""The Llama family's checkpoints: config readers (HF config.json, GGUF metadata) and where each
of our parameters lives in a Hugging Face checkpoint (GGUF tensors are renamed to HF names).

Hugging Face stores a Linear as [out, in]; we store [in, heads, head_dim] (and the reverse for
the output projection) so that einsum subscripts spell the shapes. The transforms below are numpy
views: on a memory-mapped file nothing is read until a device's slice is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from shardinfer.config import ModelConfig, RopeScaling
from shardinfer.weights.loader import TensorRef

# Hugging Face model_type values (and GGUF general.architecture values) this family reads.
HF_ARCHITECTURES = ("llama", "mistral", "qwen2")
GGUF_ARCHITECTURES = ("llama", "qwen2")

_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Both forms: transformers 5 puts rope_theta inside `rope_parameters`; older configs keep
    `rope_theta` at the top and `rope_scaling` (with `type` or `rope_type`) beside it."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    kwargs = {k: scaling[k] for k in _ROPE_KEYS if scaling and scaling.get(k) is not None}
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def config_from_hf(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """config.json (old and transformers-5 forms) and generation_config.json -> ModelConfig."""
    arch = raw.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {arch!r} in config.json ({', '.join(HF_ARCHITECTURES)})"
        )
    if raw.get("mlp_bias"):
        raise ValueError("config.json sets mlp_bias, which shardinfer does not support yet")
    if arch == "qwen2" and raw.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window is not supported yet")
    heads = raw["num_attention_heads"]
    theta, scaling = _rope(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    eos = _as_tuple((generation or {}).get("eos_token_id")) or _as_tuple(raw.get("eos_token_id"))
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch == "llama" and attention_bias,
        sliding_window=raw.get("sliding_window") if arch == "mistral" else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


def config_from_gguf(fields: dict[str, Any], tensor_names: Collection[str]) -> ModelConfig:
    """GGUF metadata (`fields`) and the file's GGUF tensor names -> ModelConfig."""
    a = fields.get("general.architecture")
    if a not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {a!r} is not supported ({', '.join(GGUF_ARCHITECTURES)})"
        )
    f = fields
    heads = f[f"{a}.attention.head_count"]
    hidden = f[f"{a}.embedding_length"]
    vocab = f.get(f"{a}.vocab_size") or len(f.get("tokenizer.ggml.tokens") or [])
    scaling = RopeScaling()
    if f.get(f"{a}.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", factor=f[f"{a}.rope.scaling.factor"])
    eos = f.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=a,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f[f"{a}.feed_forward_length"],
        num_layers=f[f"{a}.block_count"],
        num_heads=heads,
        num_kv_heads=f.get(f"{a}.attention.head_count_kv", heads),
        head_dim=f.get(f"{a}.attention.key_length", hidden // heads),
        rms_norm_eps=f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=f.get(f"{a}.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=f.get(f"{a}.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        checkpoint_dtype="gguf",
    )


# GGUF tensor name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf(gguf_name: str) -> str | None:
    """A GGUF tensor's Hugging Face name; None for tensors we do not use (rope_freqs, ...)."""
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each q/k head; undo it so the
    weights match the rotate-half RoPE that Hugging Face (and we) use."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A dequantized GGUF tensor (HF layout) as a Hugging Face checkpoint holds it: llama.cpp
    permutes a Llama model's q/k rows (transformers undoes it the same way)."""
    if cfg.architecture == "llama" and hf_name.endswith("q_proj.weight"):
        return _unpermute(w, cfg.num_heads)
    if cfg.architecture == "llama" and hf_name.endswith("k_proj.weight"):
        return _unpermute(w, cfg.num_kv_heads)
    return w


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
