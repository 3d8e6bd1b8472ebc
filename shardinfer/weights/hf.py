"""Hugging Face model directories: config.json (old and transformers-5 forms) and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shardinfer.config import ModelConfig, RopeScaling
from shardinfer.weights.safetensors_io import SafetensorsFile

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
    arch = raw.get("model_type")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported model_type {arch!r} in config.json (llama, mistral, qwen2)")
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


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return config_from_hf(json.loads(path.read_text()), generation)


class SafetensorsDirectory:
    """All *.safetensors files of a directory as one name -> lazy array source."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{directory} has no *.safetensors files")
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            f = SafetensorsFile(path)
            for name in f.names():
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
