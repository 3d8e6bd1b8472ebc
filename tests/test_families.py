"""The family registry: Llama is one entry; an unknown architecture is refused by name; a second
family (a toy decoder defined here: one module and one `register` entry) loads, runs
`Model.logits`, generates through the unchanged engine and round-trips a checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import shardinfer as si
from shardinfer.models import registry
from shardinfer.models.interface import Decoder, LayerKV
from shardinfer.models.weights import embed_rows, weight
from shardinfer.weights.loader import TensorRef

MESH = "data=2,model=4"


# ---- the toy family: config, module, checkpoint names ----------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    architecture: str = "toy"
    vocab_size: int = 64
    hidden_size: int = 16
    max_position_embeddings: int = 128
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_layers: int = 1  # the cache's shapes: one layer, one KV head of hidden_size
    num_kv_heads: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ToyConfig:
        return cls(**{**data, "eos_token_ids": tuple(data["eos_token_ids"])})


class Toy(nnx.Module):
    """hidden[t] = scale * mean of the embeddings of tokens 0..t; logits against the table.
    The cached "values" are the embeddings, so decode sums the cache instead."""

    def __init__(self, cfg, sharder, dtype, rngs, quantize=None, layer_loop="scan"):
        self.cfg, self.dtype, self.layer_loop = cfg, dtype, layer_loop
        table = (cfg.vocab_size, cfg.hidden_size)
        self.embed = weight(rngs, table, ("vocab", "embed"), (1,), dtype, quantize)
        self.scale = nnx.Param(jnp.full((cfg.hidden_size,), 30.0, dtype), logical_axes=("embed",))

    def __call__(self, tokens, positions, cache=None, cache_len=0):
        x = embed_rows(self.embed, tokens, self.dtype)  # [B, T, E]
        t = tokens.shape[1]
        prefix = jnp.tril(jnp.ones((t, t), x.dtype))
        total = jnp.einsum("st,bte->bse", prefix, x)
        if cache is not None:
            values = (cache[0] if isinstance(cache, list) else cache).v  # [(L,) B, 1, S, E]
            values = values[0] if values.ndim == 5 else values
            if cache_len:
                values = values[:, :, :cache_len]
            seen = jnp.arange(values.shape[2])[None, :] < positions[:, :1]  # [B, S]
            total = total + jnp.einsum("bs,bse->be", seen, values[:, 0])[:, None]
        hidden = total / (positions[..., None] + 1).astype(x.dtype) * self.scale[...]
        kv = LayerKV(x.transpose(0, 2, 1)[:, None], x[:, None])  # [B, 1, E, T], [B, 1, T, E]
        return hidden, ([kv] if self.layer_loop == "unrolled" else LayerKV(kv.k[None], kv.v[None]))

    def logits(self, hidden):
        return jnp.einsum("bte,ve->btv", hidden.astype(jnp.float32), self.embed[...])


def toy_config_from_hf(raw, generation=None) -> ToyConfig:
    return ToyConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"])


def toy_hf_tensor(path, cfg) -> TensorRef:
    shapes = {("embed",): (cfg.vocab_size, cfg.hidden_size), ("scale",): (cfg.hidden_size,)}
    return TensorRef(".".join(path), shapes[path], lambda w: w)


TOY = registry.Family(
    name="toy",
    kind="decoder",
    architectures=("toy",),
    build=Toy,
    config_type=ToyConfig,
    config_from_hf=toy_config_from_hf,
    hf_tensor=toy_hf_tensor,
)


@pytest.fixture
def toy_family():
    registry.register(TOY)
    try:
        yield TOY
    finally:
        registry.unregister(TOY.name)


def reference_logits(embed: np.ndarray, scale: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    x = embed[tokens]  # [B, T, E]
    mean = np.cumsum(x, axis=1) / np.arange(1, tokens.shape[1] + 1)[None, :, None]
    return (mean * scale) @ embed.T


# ---- the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_family_serves_its_architectures(arch):
    family = registry.family_for(arch)
    assert family.name == "llama" and family.kind == "decoder"
    assert registry.hf_family(arch) is family
    assert family.config_type is si.ModelConfig
    if arch != "mistral":
        assert registry.gguf_family(arch) is family


def test_unknown_architectures_name_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2' in config\.json; "
                       r"supported: llama, mistral, qwen2"):  # fmt: skip
        si.load_model(tmp_path)
    cfg = si.ModelConfig("gpt2", 64, 16, 32, 1, num_heads=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'; supported: llama"):
        si.init_random_model(cfg, mesh="data=8")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mistral'; supported: "):
        registry.gguf_family("mistral")


def test_an_architecture_belongs_to_one_family():
    with pytest.raises(ValueError, match="already belong to family 'llama'"):
        registry.register(dataclasses.replace(TOY, architectures=("toy", "qwen2")))
    assert "toy" not in registry.supported_architectures()


def test_llama_follows_the_decoder_interface():
    cfg = si.ModelConfig("llama", 64, 16, 32, 1, num_heads=2, num_kv_heads=1, head_dim=8)
    model = si.init_random_model(cfg, mesh="data=8")
    assert model.family.name == "llama"
    assert isinstance(nnx.merge(model.graphdef, model.state), Decoder)


# ---- a second family, through the unchanged model and engine code -----------------------------


def test_toy_family_runs_logits(toy_family):
    model = si.init_random_model(ToyConfig(), mesh=MESH)
    assert model.family is toy_family
    assert isinstance(nnx.merge(model.graphdef, model.state), Decoder)
    assert model.state["embed"].get_value().sharding.spec == P("model")  # vocab on `model`
    tokens = np.random.default_rng(0).integers(0, 64, (3, 7))
    embed, scale = np.asarray(model.state["embed"][...]), np.asarray(model.state["scale"][...])
    expected = reference_logits(embed, scale, tokens)
    np.testing.assert_allclose(model.logits(tokens), expected, rtol=1e-5, atol=1e-5)


def test_toy_family_generates_through_the_engine(toy_family):
    model = si.init_random_model(ToyConfig(), mesh=MESH)
    llm = si.LLM(model, max_batch=2, max_seq_len=32, compilation_cache=None)
    prompts = [[5, 9, 2], [7]]
    outputs = llm.generate(prompts, si.SamplingParams(temperature=0.0, max_tokens=4))
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = list(prompt)
        for _ in range(4):  # greedy over full forward passes, no cache
            ids.append(int(model.logits(np.array([ids]))[0, -1].argmax()))
        assert list(out.token_ids) == ids[len(prompt) :]


def test_toy_family_loads_hf_files_and_round_trips_a_checkpoint(toy_family, tmp_path):
    rng = np.random.default_rng(1)
    embed = rng.normal(size=(64, 16)).astype(np.float32) * 0.1
    scale = rng.normal(size=(16,)).astype(np.float32)
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "toy", "vocab_size": 64, "hidden_size": 16}
    (hf / "config.json").write_text(json.dumps(config))
    save_file({"embed": embed, "scale": scale}, str(hf / "model.safetensors"))
    model = si.load_model(hf, mesh=MESH)
    tokens = rng.integers(0, 64, (2, 5))
    expected = reference_logits(embed, scale, tokens)
    np.testing.assert_allclose(model.logits(tokens), expected, rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "ckpt")
    restored = si.load_model(tmp_path / "ckpt", mesh="model=8")
    assert restored.config == model.config
    np.testing.assert_allclose(restored.logits(tokens), expected, rtol=1e-5, atol=1e-5)


# ---- the public interface a user writes a family against ---------------------------------------


def test_the_family_interface_is_one_public_import():
    from shardinfer import family

    assert family.Family is registry.Family and family.register is registry.register
    assert family.LayerKV is LayerKV and family.weight is weight and family.TensorRef is TensorRef
    for name in family.__all__:
        assert getattr(family, name) is not None


def test_a_family_without_hf_readers_builds_saves_and_refuses_hf_dirs(tmp_path):
    bare = dataclasses.replace(TOY, name="bare", config_from_hf=None, hf_tensor=None)
    registry.register(bare)
    try:
        model = si.init_random_model(ToyConfig(), mesh=MESH)
        model.save(tmp_path / "ckpt")
        restored = si.load_model(tmp_path / "ckpt", mesh="model=8")
        tokens = np.arange(6)[None]
        np.testing.assert_allclose(restored.logits(tokens), model.logits(tokens), atol=1e-5)
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 64}))
        with pytest.raises(ValueError, match="family 'bare' reads no Hugging Face directories"):
            si.load_model(hf, mesh=MESH)
    finally:
        registry.unregister("bare")
    with pytest.raises(ValueError, match="both config_from_hf and hf_tensor, or neither"):
        dataclasses.replace(TOY, hf_tensor=None)


def test_init_random_model_takes_the_rules(toy_family):
    rules = si.ShardingRules.load().replace(vocab=None)
    model = si.init_random_model(ToyConfig(), mesh=MESH, rules=rules)
    assert model.state["embed"].get_value().sharding.spec == P()  # vocab no longer on `model`
    with pytest.raises(ValueError, match=r"no rule for logical axis \['vocabulary'\]"):
        rules.replace(vocabulary=None)
