"""shardinfer.kernels.attention: the prefill (causal) and decode attention kernels against numpy.

The numpy reference computes the masked softmax attention in float64; the kernel is float32
with its own exp, so it must agree to float32 rounding (about 1e-6 here). The bit-level
properties the model relies on are checked exactly: a row's result does not depend on the
batch or on the rows after it, and every instruction set gives the same bits.

Nothing is skipped: where the compiled kernels cannot load (not x86-64, no AVX2), the
functions run their XLA formulation and the same checks apply to it, except the instruction
set one, which then says so by checking that `supports` is False.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from shardinfer import kernels
from shardinfer.kernels import attention
from shardinfer.models import kernel_attention
from shardinfer.sharding import Sharder, ShardingRules

RNG = np.random.default_rng(20261204)
run = jax.jit(attention.prefill_attention, static_argnums=4)


def _inputs(b, t, kv, g, d, positions=None):
    q = (RNG.standard_normal((b, t, kv * g, d)) * d**-0.5).astype(np.float32)
    kt = RNG.standard_normal((b, kv, d, t)).astype(np.float32)
    v = RNG.standard_normal((b, kv, t, d)).astype(np.float32)
    if positions is None:
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return q, kt, v, positions


def _numpy_attention(q, kt, v, positions, window=None):
    b, t, h, d = q.shape
    kv = kt.shape[1]
    g = h // kv
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        qp, kp = positions[bi][:, None], positions[bi][None, :]
        seen = kp <= qp
        if window is not None:
            seen &= qp - kp < window
        for hi in range(h):
            s = q[bi, :, hi].astype(np.float64) @ kt[bi, hi // g].astype(np.float64)
            s = np.where(seen, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, hi // g].astype(np.float64)
    return out


CASES = [
    # b, t, kv, groups, head_dim, window
    (1, 512, 3, 3, 64, None),  # SmolLM2's shapes at a 512-token prompt
    (2, 37, 2, 4, 128, None),  # a length that is not a multiple of the 32-key groups
    (3, 16, 1, 1, 64, 5),  # a sliding window
    (1, 1, 2, 2, 64, None),  # one token
    (2, 70, 4, 1, 192, 33),
]


@pytest.mark.parametrize("b,t,kv,g,d,window", CASES)
def test_kernel_matches_numpy(b, t, kv, g, d, window):
    q, kt, v, pos = _inputs(b, t, kv, g, d)
    want = _numpy_attention(q, kt, v, pos, window)
    for fn in (run, attention.prefill_attention_reference):
        got = np.asarray(fn(q, kt, v, pos, window))
        assert got.dtype == np.float32 and got.shape == q.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-6)


def test_any_positions_are_masked_by_position_not_by_index():
    # Positions out of order (as a caller may pass): what a query sees is decided by position.
    t = 100
    perm = np.random.default_rng(1).permutation(t).astype(np.int32)
    q, kt, v, pos = _inputs(2, t, 2, 3, 64, positions=np.stack([perm, perm[::-1]]))
    np.testing.assert_allclose(np.asarray(run(q, kt, v, pos, None)),
                               _numpy_attention(q, kt, v, pos), rtol=0, atol=3e-6)  # fmt: skip


def test_a_row_gets_the_same_bits_whatever_shares_the_call():
    q, kt, v, pos = _inputs(3, 96, 3, 3, 64)
    together = np.asarray(run(q, kt, v, pos, None))
    for i in range(3):
        alone = np.asarray(run(q[i : i + 1], kt[i : i + 1], v[i : i + 1], pos[i : i + 1], None))
        np.testing.assert_array_equal(alone[0], together[i])
    # A prompt's first rows come out the same bits as the shorter prompt's (the keys after
    # them are never seen): what makes a prefill agree with the same prefix prefilled alone.
    for t in (1, 31, 32, 33, 64, 95):
        short = run(q[:1, :t], np.ascontiguousarray(kt[:1, :, :, :t]), v[:1, :, :t],
                    pos[:1, :t], None)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(short)[0], together[0, :t])


def test_every_instruction_set_gives_the_same_bits():
    isas = attention._supported_isas()
    if not kernels.available():
        assert isas == [] and not attention.supports(64)
        return
    assert isas[0] == "avx2"
    q, kt, v, pos = _inputs(2, 77, 3, 3, 128)
    results = []
    try:
        for isa in isas:
            attention._set_isa(isa)
            jax.clear_caches()
            results.append(np.asarray(run(q, kt, v, pos, 40)))
    finally:
        attention._set_isa(None)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_sharded_over_batch_and_heads_gives_the_one_device_bits():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "the tests run with 8 simulated CPU devices (conftest.py)"
    q, kt, v, pos = _inputs(2, 64, 4, 2, 64)
    rules = ShardingRules((("batch", "data"), ("q_heads", "model"), ("kv_heads", "model")))
    one = Sharder(Mesh(devices[:1].reshape(1, 1), ("data", "model")), rules)
    want = np.asarray(jax.jit(lambda *a: kernel_attention.prefill_attention(*a, None, one))(
        q, kt, v, pos))  # fmt: skip
    for shape in ((2, 4), (1, 8), (8, 1)):
        sharder = Sharder(Mesh(devices.reshape(shape), ("data", "model")), rules)
        got = jax.jit(lambda *a, s=sharder: kernel_attention.prefill_attention(*a, None, s))(
            q, kt, v, pos)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), want)


def test_other_head_dims_and_platforms_use_xla():
    # head_dim 80 is not a multiple of 64: the XLA formulation serves, with the same results.
    q, kt, v, pos = _inputs(1, 20, 1, 2, 80)
    assert not attention.supports(80)
    np.testing.assert_allclose(np.asarray(run(q, kt, v, pos, None)),
                               _numpy_attention(q, kt, v, pos), rtol=0, atol=3e-6)  # fmt: skip
    lowered = jax.jit(attention.prefill_attention, static_argnums=4).lower(q, kt, v, pos, None)
    assert kernels.ATTENTION_TARGET not in lowered.as_text()
    if kernels.available():
        q, kt, v, pos = _inputs(1, 20, 1, 2, 64)
        text = jax.jit(attention.prefill_attention, static_argnums=4).lower(
            q, kt, v, pos, None).as_text()  # fmt: skip
        assert kernels.ATTENTION_TARGET in text


def test_bad_arguments_are_refused():
    q, kt, v, pos = _inputs(1, 8, 2, 2, 64)
    with pytest.raises(ValueError, match="shapes do not agree"):
        attention.prefill_attention(q, kt[:, :, :, :4], v, pos)
    with pytest.raises(ValueError, match="do not divide"):
        attention.prefill_attention(q[:, :, :3], kt, v, pos)
    with pytest.raises(ValueError, match="window"):
        attention.prefill_attention(q, kt, v, pos, 0)
    with pytest.raises(ValueError, match="4-D"):
        attention.prefill_attention(q[0], kt, v, pos)
    assert jnp.isfinite(attention.prefill_attention(q, kt, v, pos)).all()


# ---- decode: one query per row against the cache ----------------------------------------------

decode = jax.jit(attention.decode_attention, static_argnums=6)
decode_reference = jax.jit(attention.decode_attention_reference, static_argnums=6)


def _decode_inputs(b, s, kv, g, d, positions, stale=np.nan):
    """A whole sequence of s tokens per row, and the decode step of row i at positions[i]: its
    query, the cache (slots past the position hold `stale`, as slots a step has not written
    may), its new key and value; and the sequence itself for the prefill."""
    q_all, kt, v, seq_pos = _inputs(b, s, kv, g, d)
    p = np.asarray(positions, np.int32)
    rows = np.arange(b)
    q, k_new, v_new = q_all[rows, p], kt[rows, :, :, p], v[rows, :, p]
    kt_cache, v_cache = kt.copy(), v.copy()
    for i in range(b):
        kt_cache[i, :, :, p[i] :] = stale
        v_cache[i, :, p[i] :] = stale
    return (q, kt_cache, v_cache, k_new, v_new, p), (q_all, kt, v, seq_pos)


DECODE_CASES = [
    # b, slots, kv, groups, head_dim, positions, window
    (1, 128, 3, 3, 64, [100], None),  # SmolLM2's shapes
    (4, 128, 3, 3, 64, [0, 31, 32, 127], None),  # group edges: first slot, last of a group
    (3, 77, 2, 4, 128, [5, 40, 76], 20),  # slots not a multiple of 32, a sliding window
    (2, 64, 1, 1, 64, [63, 1], 1),  # a window of one: the row sees only itself
    (2, 96, 1, 9, 64, [50, 95], None),  # more query heads than a score tile holds
]


@pytest.mark.parametrize("b,s,kv,g,d,positions,window", DECODE_CASES)
def test_decode_matches_numpy_and_is_the_prefill_s_last_row(b, s, kv, g, d, positions, window):
    step, sequence = _decode_inputs(b, s, kv, g, d, positions)
    full = _numpy_attention(*sequence, window)
    want = full[np.arange(b), step[-1]]
    got = np.asarray(decode(*step, window))
    assert got.dtype == np.float32 and got.shape == step[0].shape
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-6)  # the stale NaNs are never read
    clean = (step[0], np.nan_to_num(step[1]), np.nan_to_num(step[2]), *step[3:])
    np.testing.assert_allclose(np.asarray(decode_reference(*clean, window)), want, rtol=0,
                               atol=3e-6)  # fmt: skip
    # The bits the prefill kernel gives that row of the whole sequence (what makes cached
    # decode agree with a full forward pass, and a row agree with itself in any batch).
    prefill = np.asarray(run(*sequence, window))[np.arange(b), step[-1]]
    np.testing.assert_array_equal(got, prefill)


def test_decode_rows_do_not_depend_on_the_batch_or_the_cache_s_capacity():
    step, _ = _decode_inputs(5, 128, 3, 3, 64, [3, 40, 64, 90, 127], stale=0.5)
    together = np.asarray(decode(*step, None))
    for i in range(5):
        alone = np.asarray(decode(*(a[i : i + 1] for a in step), None))
        np.testing.assert_array_equal(alone[0], together[i])
    # The same rows in a cache twice as long: nothing past a row's position is read.
    q, kt, v, k_new, v_new, pos = step
    longer = (q, np.concatenate([kt, kt], -1), np.concatenate([v, v], 2), k_new, v_new, pos)
    np.testing.assert_array_equal(np.asarray(decode(*longer, None)), together)


def test_decode_positions_outside_the_cache_give_zeros():
    step, _ = _decode_inputs(3, 64, 2, 2, 64, [10, 10, 10], stale=1.0)
    pos = np.array([-1, 10, 64], np.int32)
    for fn in (decode, decode_reference):
        got = np.asarray(fn(*step[:5], pos, None))
        assert (got[0] == 0).all() and (got[2] == 0).all() and np.isfinite(got[1]).all()


def test_decode_every_instruction_set_gives_the_same_bits():
    isas = attention._supported_isas()
    if not kernels.available():
        assert isas == [] and not attention.supports(64)
        return
    step, _ = _decode_inputs(3, 77, 3, 3, 128, [12, 50, 76])
    results = []
    try:
        for isa in isas:
            attention._set_isa(isa)
            jax.clear_caches()
            results.append(np.asarray(decode(*step, 40)))
    finally:
        attention._set_isa(None)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_decode_sharded_over_batch_and_heads_gives_the_one_device_bits():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "the tests run with 8 simulated CPU devices (conftest.py)"
    step, _ = _decode_inputs(8, 64, 4, 2, 64, list(range(3, 64, 8)), stale=0.0)
    rules = ShardingRules((("batch", "data"), ("q_heads", "model"), ("kv_heads", "model")))
    one = Sharder(Mesh(devices[:1].reshape(1, 1), ("data", "model")), rules)
    want = np.asarray(jax.jit(lambda *a: kernel_attention.decode_attention(*a, None, one))(*step))
    for shape in ((2, 4), (1, 8), (8, 1)):
        sharder = Sharder(Mesh(devices.reshape(shape), ("data", "model")), rules)
        got = jax.jit(lambda *a, s=sharder: kernel_attention.decode_attention(*a, None, s))(*step)
        np.testing.assert_array_equal(np.asarray(got), want)
    if kernels.available():
        text = jax.jit(lambda *a: kernel_attention.decode_attention(*a, None, one)).lower(
            *step).as_text()  # fmt: skip
        assert kernels.DECODE_ATTENTION_TARGET in text


def test_decode_bad_arguments_are_refused():
    (q, kt, v, k_new, v_new, pos), _ = _decode_inputs(2, 32, 2, 2, 64, [3, 4], stale=0.0)
    with pytest.raises(ValueError, match="shapes do not agree"):
        attention.decode_attention(q, kt, v[:, :, :8], k_new, v_new, pos)
    with pytest.raises(ValueError, match="shapes do not agree"):
        attention.decode_attention(q, kt, v, k_new, v_new, pos[:1])
    with pytest.raises(ValueError, match="do not divide"):
        attention.decode_attention(q[:, :3], kt, v, k_new, v_new, pos)
    with pytest.raises(ValueError, match="window"):
        attention.decode_attention(q, kt, v, k_new, v_new, pos, -2)
    with pytest.raises(ValueError, match="3-, 4-, 4-"):
        attention.decode_attention(q[0], kt, v, k_new, v_new, pos)
