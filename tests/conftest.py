"""Test setup: 8 simulated CPU devices (before jax is imported) and tiny Hugging Face models.

The reference for every numeric test is Hugging Face transformers (PyTorch, CPU), loading the
same weights that shardinfer loads.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)

import json
from pathlib import Path

import jax
import pytest
import torch

torch.set_num_threads(2)
jax.config.update("jax_default_matmul_precision", "highest")

MESHES = ["data=8", "model=8", "data=2,model=4"]

# Small enough to compile in a second, shaped to exercise what real models do: grouped-query
# attention (4:1, 2:1 and a single KV head), llama3 RoPE scaling, qkv bias, tied embeddings,
# an explicit head_dim that differs from hidden/heads, and a sliding window shorter than the
# test sequences.
TINY = {
    "llama": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, sliding_window=8),
}


def _build_tiny(arch: str, directory: Path) -> Path:
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # logits of order 1-10, so a 1e-4 tolerance means something
        rms_norm_eps=1e-5,
        **TINY[arch],
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny_hf(request, tmp_path_factory) -> Path:
    """A random Hugging Face checkpoint directory (transformers-5 config form)."""
    return _build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _build_tiny("llama", tmp_path_factory.mktemp("llama_only"))


def hf_model(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_logits(directory: Path, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return hf_model(directory)(torch.as_tensor(tokens)).logits.numpy()


def to_old_config_form(directory: Path) -> None:
    """Rewrites config.json as transformers 4 wrote it (rope_theta, rope_scaling, torch_dtype)."""
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    raw["torch_dtype"] = raw.pop("dtype")
    path.write_text(json.dumps(raw))
