"""Cached decode (prefill, then one token at a time) equals a full forward pass."""

import jax
import numpy as np
import pytest

import shardinfer as si
from shardinfer.engine.engine import decode_logits, prefill_logits
from shardinfer.engine.kv_cache import init_cache, insert, write_rows


@pytest.mark.parametrize(
    "mesh, cache_len, layer_loop",
    [
        ("data=2,model=4", 0, "unrolled"),
        ("model=8", 0, "scan"),
        ("data=2,model=4", 16, "scan"),
        ("model=8", 16, "unrolled"),
    ],
)
def test_cached_decode_equals_full_forward(tiny_hf, mesh, cache_len, layer_loop):
    """cache_len=16: attention reads only the first 16 of the cache's 32 positions. Both
    layer loops: a stacked cache under lax.scan, a list of per-layer caches unrolled."""
    model = si.load_model(tiny_hf, mesh=mesh, layer_loop=layer_loop)
    rows, total, bucket = 4, 14, 8
    prompt_lengths = np.array([3, 8, 1, 5], np.int32)  # ragged rows, right-padded
    tokens = np.random.default_rng(1).integers(0, 256, (rows, total), dtype=np.int32)
    full = model.logits(tokens)  # [rows, total, vocab]

    stacked = layer_loop == "scan"
    cache = init_cache(model.config, model.sharder, rows, 32, model.dtype, stacked)
    prefill = jax.jit(lambda s, t, n: prefill_logits(model.graphdef, s, t, n))
    decode = jax.jit(lambda s, c, t, p: decode_logits(model.graphdef, s, c, t, p, cache_len))
    padded = np.where(np.arange(bucket) < prompt_lengths[:, None], tokens[:, :bucket], 0)
    logits, kv = prefill(model.state, padded, prompt_lengths)
    cache = insert(cache, kv, np.arange(rows, dtype=np.int32))  # row i into slot i
    np.testing.assert_allclose(logits, full[np.arange(rows), prompt_lengths - 1], atol=1e-4, rtol=0)
    positions = prompt_lengths.copy()
    slots = np.arange(rows, dtype=np.int32)
    for _ in range(total - prompt_lengths.max()):
        logits, kv = decode(model.state, cache, tokens[np.arange(rows), positions], positions)
        cache = write_rows(cache, kv, slots, positions, model.data_size)
        np.testing.assert_allclose(logits, full[np.arange(rows), positions], atol=1e-4, rtol=0)
        positions += 1
