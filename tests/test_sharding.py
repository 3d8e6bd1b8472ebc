"""The PartitionSpec of every parameter (and of the KV cache) is what the rules say."""

import logging

import pytest
from jax.sharding import PartitionSpec as P

import shardinfer as si
from shardinfer import sharding
from shardinfer.engine.kv_cache import cache_shardings

# The tiny Llama: vocab 256, embed 64, mlp 128, 8 query heads, 2 KV heads, head_dim 8.
# On model=8 and model=4 the 2 KV heads do not divide: those fall back to replicated.
EXPECTED = {
    "data=8": {},  # no parameter has a batch axis: everything replicated
    "model=8": {
        "embed_tokens": P("model"),
        "lm_head": P("model"),
        # Layer parameters are stacked: a leading "layers" axis, never split.
        "layers.self_attn.q_proj": P(None, None, "model"),
        "layers.self_attn.o_proj": P(None, "model"),
        "layers.mlp.gate_proj": P(None, None, "model"),
        "layers.mlp.up_proj": P(None, None, "model"),
        "layers.mlp.down_proj": P(None, "model"),
    },
}
EXPECTED["data=2,model=4"] = EXPECTED["model=8"]
ALL_PARAMS = {
    "embed_tokens",
    "lm_head",
    "norm.weight",
    "layers.input_layernorm.weight",
    "layers.post_attention_layernorm.weight",
    "layers.self_attn.q_proj",
    "layers.self_attn.k_proj",
    "layers.self_attn.v_proj",
    "layers.self_attn.o_proj",
    "layers.mlp.gate_proj",
    "layers.mlp.up_proj",
    "layers.mlp.down_proj",
}


@pytest.mark.parametrize("mesh", list(EXPECTED))
def test_every_parameter_spec_stacked(tiny_llama, mesh):
    model = si.load_model(tiny_llama, mesh=mesh, layer_loop="scan")
    table = {name: spec for name, _, spec in model.sharding_table()}
    assert set(table) == ALL_PARAMS
    for name in ALL_PARAMS:
        assert table[name] == str(EXPECTED[mesh].get(name, P())), name
    down = model.state["layers"]["mlp"]["down_proj"].get_value()
    assert down.shape == (2, 128, 64)  # all layers in one array
    assert down.sharding.spec == EXPECTED[mesh].get("layers.mlp.down_proj", P())


@pytest.mark.parametrize("mesh", list(EXPECTED))
def test_every_parameter_spec_unrolled(tiny_llama, mesh):
    """One array per layer: the stacked spec without its leading (never split) layers axis."""
    model = si.load_model(tiny_llama, mesh=mesh, layer_loop="unrolled")
    table = {name: spec for name, _, spec in model.sharding_table()}
    per_layer = {name.replace("layers.", "layers.*.") for name in ALL_PARAMS}
    assert set(table) == per_layer
    for name in ALL_PARAMS:
        spec = EXPECTED[mesh].get(name, P())
        if name.startswith("layers."):
            spec = P(*spec[1:])
        assert table[name.replace("layers.", "layers.*.")] == str(spec), name
    down = model.state["layers"][1]["mlp"]["down_proj"].get_value()
    assert down.shape == (128, 64)


def test_fallback_is_logged_once(tiny_llama, caplog):
    sharding._already_logged.clear()
    with caplog.at_level(logging.INFO, logger="shardinfer"):
        si.load_model(tiny_llama, mesh="data=2,model=4")
        si.load_model(tiny_llama, mesh="data=2,model=4")
    lines = [r.message for r in caplog.records if "does not divide" in r.message]
    assert lines == ["kv_heads of size 2 does not divide by mesh axis model=4: replicated instead"]


def test_kv_cache_spec():
    cfg = si.ModelConfig("llama", 256, 64, 128, 2, num_heads=8, num_kv_heads=4, head_dim=8)
    sharder = sharding.Sharder(si.make_mesh("data=2,model=4"), si.ShardingRules.load())
    # keys [layers, batch, kv_heads, head_dim, seq], values [..., seq, head_dim]
    assert cache_shardings(cfg, sharder, batch=4, max_len=32).k.spec == P(None, "data", "model")
    # 3 rows do not divide data=2: the batch falls back to replicated rather than failing.
    assert cache_shardings(cfg, sharder, batch=3, max_len=32).v.spec == P(None, None, "model")


def test_rules_refuse_two_dims_on_one_axis():
    rules = si.ShardingRules((("vocab", "model"), ("mlp", "model")))
    with pytest.raises(ValueError, match="both map to mesh axis 'model'"):
        sharding.logical_to_spec(("vocab", "mlp"), (8, 8), si.make_mesh("model=8"), rules)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        sharding.logical_to_spec(
            ("experts",), (8,), si.make_mesh("model=8"), si.ShardingRules.load()
        )
