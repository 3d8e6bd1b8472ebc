"""The GGUF weight cache: a second load maps it (no dequantizing), on any mesh, with the same
logits; a damaged entry is ignored and rewritten; dtypes and modes get their own entries, and
a changed file replaces its old ones."""

import logging

import gguf
import numpy as np
import pytest
from test_gguf import _write_gguf

import shardinfer as si
from shardinfer.weights.gguf_file import GGUFFile

TOKENS = np.random.default_rng(5).integers(0, 256, (2, 9))


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, gguf.GGMLQuantizationType.Q4_1, tied=False)
    return path


def _no_dequantizing(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"read {name} from the GGUF file instead of the cache")

    monkeypatch.setattr(GGUFFile, "get", refuse)


def test_second_load_maps_the_cache_on_another_mesh(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "weights"
    expected = si.load_model(tiny_gguf, mesh="data=8", weight_cache=None).logits(TOKENS)
    first = si.load_model(tiny_gguf, mesh="data=8", weight_cache=cache)
    assert len(list(cache.glob("*.bin"))) == len(list(cache.glob("*.json"))) == 1
    np.testing.assert_array_equal(first.logits(TOKENS), expected)
    _no_dequantizing(monkeypatch)
    for mesh in ("model=8", "data=2,model=4"):
        mapped = si.load_model(tiny_gguf, mesh=mesh, weight_cache=cache)
        np.testing.assert_allclose(mapped.logits(TOKENS), expected, atol=1e-5, rtol=0)


def test_damaged_entry_is_ignored_and_rewritten(tiny_gguf, tmp_path, caplog):
    cache = tmp_path / "weights"
    expected = si.load_model(tiny_gguf, weight_cache=cache).logits(TOKENS)
    (data,) = cache.glob("*.bin")
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="shardinfer"):
        again = si.load_model(tiny_gguf, weight_cache=cache)
    assert "ignoring weight cache" in caplog.text and "size is wrong" in caplog.text
    np.testing.assert_array_equal(again.logits(TOKENS), expected)
    assert data.stat().st_size == size  # written again, whole
    (index,) = cache.glob("*.json")
    index.write_text(index.read_text().replace('"float32"', '"float16"', 1))  # a different list
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardinfer"):
        np.testing.assert_array_equal(
            si.load_model(tiny_gguf, weight_cache=cache).logits(TOKENS), expected
        )
    assert "parameter list differs" in caplog.text


def test_dtypes_modes_and_changed_files_get_their_own_entries(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "weights"
    si.load_model(tiny_gguf, weight_cache=cache)
    bf16 = si.load_model(tiny_gguf, dtype="bfloat16", weight_cache=cache)
    int8 = si.load_model(tiny_gguf, quantize="int8", weight_cache=cache)
    assert len(list(cache.glob("*.bin"))) == 3
    with monkeypatch.context() as patch:
        _no_dequantizing(patch)
        np.testing.assert_array_equal(
            si.load_model(tiny_gguf, dtype="bfloat16", weight_cache=cache).logits(TOKENS),
            bf16.logits(TOKENS),
        )
        np.testing.assert_array_equal(
            si.load_model(tiny_gguf, quantize="int8", weight_cache=cache).logits(TOKENS),
            int8.logits(TOKENS),
        )
    _write_gguf(tiny_gguf, gguf.GGMLQuantizationType.Q8_0, tied=False)  # the file changed
    reloaded = si.load_model(tiny_gguf, weight_cache=cache)
    # The new version's entry replaces the three of the old one.
    assert len(list(cache.glob("*.bin"))) == len(list(cache.glob("*.json"))) == 1
    fresh = si.load_model(tiny_gguf, weight_cache=None)
    np.testing.assert_array_equal(reloaded.logits(TOKENS), fresh.logits(TOKENS))


def test_least_recently_used_entries_go_past_the_size_limit(tiny_gguf, tmp_path, monkeypatch):
    from shardinfer.weights import host_cache

    cache = tmp_path / "weights"

    def load_and_name(**kwargs) -> set:
        before = set(cache.glob("*.bin"))
        si.load_model(tiny_gguf, weight_cache=cache, **kwargs)
        return set(cache.glob("*.bin")) - before

    (float32,) = load_and_name()
    (bfloat16,) = load_and_name(dtype="bfloat16")
    assert load_and_name() == set()  # mapped: float32 is now the most recently used
    limit = float32.stat().st_size + bfloat16.stat().st_size
    monkeypatch.setattr(host_cache, "MAX_TOTAL_BYTES", limit)
    (int8,) = load_and_name(quantize="int8")  # over the limit: bfloat16 goes, not float32
    assert set(cache.glob("*.bin")) == {float32, int8}
    assert not bfloat16.with_suffix(".json").exists()


def test_unusable_cache_directory_only_warns(tiny_gguf, tmp_path, caplog):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    expected = si.load_model(tiny_gguf, weight_cache=None).logits(TOKENS)
    with caplog.at_level(logging.WARNING, logger="shardinfer"):
        model = si.load_model(tiny_gguf, weight_cache=not_a_directory)
    assert "could not write the weight cache" in caplog.text
    np.testing.assert_array_equal(model.logits(TOKENS), expected)
    assert not_a_directory.read_text() == "x"
