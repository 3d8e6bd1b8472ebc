"""GGUF files (llama.cpp's format): config, dequantized tensors and tokenizer metadata.

Tensors are exposed under Hugging Face names, so one name map (names.py) serves both formats.
Each is dequantized on the host only when asked for, one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shardinfer.config import ModelConfig, RopeScaling
from shardinfer.weights.gguf_quants import dequantize
from shardinfer.weights.gguf_reader import read_gguf, tensor_bytes

# GGUF tensor name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
_LAYER_NAMES = {
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
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each q/k head; undo it so the
    weights match the rotate-half RoPE that Hugging Face (and we) use."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._contents = read_gguf(self.path, self._mmap)
        self.fields: dict[str, Any] = self._contents.fields
        self.arch = self.fields.get("general.architecture")
        self._tensors = {}
        for t in self._contents.tensors.values():
            name = _hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._config()

    def array_field(self, key: str) -> list | None:
        return self.fields.get(key)

    def _config(self) -> ModelConfig:
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"{self.path}: GGUF architecture {self.arch!r} is not supported")
        f, a = self.fields, self.arch
        heads = f[f"{a}.attention.head_count"]
        hidden = f[f"{a}.embedding_length"]
        vocab = f.get(f"{a}.vocab_size") or len(self.array_field("tokenizer.ggml.tokens") or [])
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
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            checkpoint_dtype="gguf",
        )

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        qtype, raw = tensor_bytes(self._mmap, self._contents, t, self.path)
        if qtype.name not in _SUPPORTED_TYPES:
            raise ValueError(
                f"{self.path}: tensor {t.name!r} is {qtype.name}; supported: "
                f"{', '.join(sorted(_SUPPORTED_TYPES))}"
            )
        w = dequantize(raw, qtype.name)
        if self.arch == "llama" and name.endswith("q_proj.weight"):
            w = _unpermute(w, self.config.num_heads)
        elif self.arch == "llama" and name.endswith("k_proj.weight"):
            w = _unpermute(w, self.config.num_kv_heads)
        return w
