"""Sharded Orbax checkpoints: save on one mesh, restore on others, refuse damaged ones."""

import shutil

import numpy as np
import pytest
from flax import nnx

import shardinfer as si

TOKENS = np.arange(24, dtype=np.int32).reshape(2, 12)


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = si.load_model(tiny_llama, mesh="data=8", layer_loop="unrolled")
    model.save(path)
    return path, model.logits(TOKENS)


@pytest.mark.parametrize(
    "mesh, layer_loop, name, expected",
    [
        ("model=8", "scan", "layers.mlp.gate_proj", "P(None, None, 'model')"),
        ("data=2,model=4", "unrolled", "layers.*.mlp.gate_proj", "P(None, 'model')"),
    ],
)
def test_restore_on_other_meshes(saved, tiny_llama, mesh, layer_loop, name, expected):
    """Saved from the unrolled (CPU default) form, which is stored stacked; restored in both."""
    path, saved_logits = saved
    model = si.load_model(path, mesh=mesh, layer_loop=layer_loop)
    assert dict(model.mesh.shape) == dict(si.make_mesh(mesh).shape)
    spec = dict((name, spec) for name, _, spec in model.sharding_table())
    assert spec[name] == expected
    # The same weights: bit for bit what loading the original checkpoint on this mesh gives.
    direct = si.load_model(tiny_llama, mesh=mesh, layer_loop=layer_loop)
    for (_, a), (_, b) in zip(
        nnx.to_flat_state(model.state), nnx.to_flat_state(direct.state), strict=True
    ):
        assert a.get_value().sharding == b.get_value().sharding
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    np.testing.assert_array_equal(model.logits(TOKENS), direct.logits(TOKENS))
    # Across meshes only the order of the all-reduce sums differs.
    np.testing.assert_allclose(model.logits(TOKENS), saved_logits, atol=1e-5, rtol=0)


def test_tokenizer_and_config_travel(saved):
    path, _ = saved
    model = si.load_model(path)
    assert model.config.architecture == "llama" and model.config.rope_scaling.factor == 8.0


def test_save_refuses_a_non_empty_directory(saved, tiny_llama):
    path, _ = saved
    with pytest.raises(ValueError, match="exists and is not empty"):
        si.load_model(tiny_llama).save(path)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for f in (broken / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot restore the checkpoint"):
        si.load_model(broken)


def test_missing_arrays_are_refused(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "no_params"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "params")
    with pytest.raises(ValueError, match="cannot restore the checkpoint"):
        si.load_model(broken)
