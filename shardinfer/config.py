"""Frozen, hashable configuration dataclasses and the YAML presets in configs/."""

from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any

import yaml

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face names it (`rope_type` and its parameters)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

    `architecture` names the model family that builds it; it is checked against the family
    registry (models/registry.py `family_for`) when a model is built or loaded, not here: this
    module is the bottom layer and knows no families."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, and Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    sliding_window: int | None = None  # Mistral: a query sees only the last `sliding_window` keys
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a positive multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even, got {self.head_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        data = dict(data)
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)


def load_preset(name: str) -> dict[str, Any]:
    """Reads configs/<name>.yaml (shipped inside the package as shardinfer.configs)."""
    text = importlib.resources.files("shardinfer.configs").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)
