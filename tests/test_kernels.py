"""shardinfer.kernels: the GGUF block matmul kernels (q8_0, q4_0, q4_1) against numpy.

The numpy reference rounds x exactly as the kernel documents (half away from zero, float32
divisions), computes each block's integer dot exactly (int64) and sums the scaled blocks in
float64. The kernel's integer work is exact, so its result may differ only by float32 rounding
of the per-block terms and their sum: |y - ref| <= 1e-5 * sum_b |term_b|. Where every scale is 1
the float work is exact too and the results must be equal.

Nothing here is skipped: on an x86-64 CPU with AVX2, FMA and F16C the compiled kernel must have
loaded (CI builds it at install time); elsewhere the test of that says so and the kernel tests
check the XLA fallback that block_matmul then uses.
"""

import platform
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import shardinfer.kernels as kernels

FORMATS = ["q8_0", "q4_0", "q4_1"]
RNG = np.random.default_rng(20261203)


def _cpu_has_kernel_isa() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: trust the library's own check
        return kernels.available()
    return {"avx2", "fma", "f16c"} <= flags


EXPECT_KERNEL = _cpu_has_kernel_isa()


@pytest.fixture
def each_isa():
    """The instruction sets to run each check under (all this CPU has), restored afterwards."""
    isas = kernels._supported_isas() if EXPECT_KERNEL else [None]
    yield isas
    if EXPECT_KERNEL:
        kernels._set_isa(None)
        kernels._set_threads(0, 4096)
        kernels._set_gemm_min_rows(-1)
        kernels._set_decode_gemm_min_rows(-1)


def _use(isa):
    if isa is not None:
        kernels._set_isa(isa)


# ---- numpy reference ---------------------------------------------------------------------------


def np_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (xq int64 [M, nb, 32], dx float32 [M, nb]), the documented rounding."""
    m_rows, k = x.shape
    xb = x.astype(np.float32).reshape(m_rows, k // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    dx = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(dx == 0, np.float32(1.0), dx)
    q = (xb / safe[..., None]).astype(np.float32)
    t = np.trunc(q)
    r = t + np.where(np.abs(q - t) >= 0.5, np.sign(q), np.float32(0.0))
    return np.clip(r, -127, 127).astype(np.int64), dx


def np_weight_ints(qs: np.ndarray, fmt: str) -> np.ndarray:
    """[N, nb, 32] int64: qs (q8_0), nibble - 8 (q4_0), nibble (q4_1)."""
    if fmt == "q8_0":
        return qs.astype(np.int64)
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)
    return nib - 8 if fmt == "q4_0" else nib


def np_block_matmul(x, qs, d, m, fmt):
    """(y float64 [M, N], sum of |per-block terms| [M, N], exact integer block dots [M, N, nb])."""
    xq, dx = np_quantize(x)
    wq = np_weight_ints(qs, fmt)
    idot = np.einsum("mbi,nbi->mnb", xq, wq)
    scale = d.astype(np.float64)[None] * dx.astype(np.float64)[:, None]
    terms = [scale * idot]
    if fmt == "q4_1":
        xsum = xq.sum(-1)
        terms.append(m.astype(np.float64)[None] * (dx.astype(np.float64) * xsum)[:, None])
    y = sum(t.sum(-1) for t in terms)
    mag = sum(np.abs(t).sum(-1) for t in terms)
    return y, mag, idot


def np_bf16(a: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (to nearest even), returned as float32."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def np_dequantize(qs, d, m, fmt) -> np.ndarray:
    """The weight [N, nb, 32] in float32, as the AMX-BF16 path dequantizes it (q4_1 with one
    rounding: a fused multiply-add, computed here in float64 and rounded once)."""
    w = d.astype(np.float64)[..., None] * np_weight_ints(qs, fmt)
    if fmt == "q4_1":
        w = w + m.astype(np.float64)[..., None]
    return w.astype(np.float32)


def np_block_matmul_bf16(x, qs, d, m, fmt):
    """The AMX-BF16 row-tiled path's math: x rounded to bfloat16, times the weight as hi + lo
    bfloat16s. (y float64 [M, N], sum of |products| [M, N])."""
    w = np_dequantize(qs, d, m, fmt)
    hi = np_bf16(w)
    lo = np_bf16(w - hi)
    n = w.shape[0]
    xb = np_bf16(x).astype(np.float64)
    wk = (hi.astype(np.float64) + lo.astype(np.float64)).reshape(n, -1)
    return xb @ wk.T, np.abs(xb) @ np.abs(wk).T


def takes_bf16_path(isa, row_tiled, m_rows) -> bool:
    """Whether a call runs the AMX-BF16 row-tiled path (x in bfloat16, not int8 blocks)."""
    active = isa if isa is not None else (kernels.isa() if kernels.available() else None)
    tiled = m_rows >= 16 if row_tiled is None else row_tiled
    return active == "amxbf16" and tiled


def expected(x, qs, d, m, fmt, isa, row_tiled):
    """(reference float64, the magnitude its tolerance scales with, tolerance factor) for the
    path a call takes: the bf16 one sums up to K float32 products in tiles (its tolerance is
    looser than the int8 blocks', whose per-block terms are exact integers times scales)."""
    if takes_bf16_path(isa, row_tiled, x.shape[0]):
        ref, mag = np_block_matmul_bf16(x, qs, d, m, fmt)
        return ref, mag, 4e-5
    ref, mag, _ = np_block_matmul(x, qs, d, m, fmt)
    return ref, mag, 1e-5


def random_problem(fmt, m_rows, n, k, *, x_scale=1.0, d_scale=0.05, zero_blocks=True):
    nb = k // 32
    x = (RNG.standard_normal((m_rows, k)) * x_scale).astype(np.float32)
    if fmt == "q8_0":
        qs = RNG.integers(-128, 128, (n, nb, 32), dtype=np.int8)
    else:
        qs = RNG.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    d = (RNG.random((n, nb)) * d_scale).astype(np.float16)
    m = (RNG.standard_normal((n, nb)) * d_scale).astype(np.float16) if fmt == "q4_1" else None
    if zero_blocks:  # an all-zero x block (dx = 0) and a zero-scale weight block
        x[0, :32] = 0.0
        d[0, -1] = 0.0
        if m_rows > 1:
            x[-1, -32:] = 0.0
    return x, qs, d, m


def check(y, ref, mag, what="", rtol=1e-5):
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape, what
    err = np.abs(y - ref)
    bound = rtol * mag + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: worst at {worst}: {y[worst]} vs {ref[worst]} (|terms| {mag[worst]})"
    )


# ---- availability ------------------------------------------------------------------------------


def test_available_where_expected():
    """x86-64 with AVX2+FMA+F16C (CI): the compiled kernels must load. Elsewhere: a reason."""
    if EXPECT_KERNEL:
        assert kernels.available(), kernels.unavailable_reason()
        assert kernels.unavailable_reason() is None
        assert kernels.isa() in ("avx2", "avxvnni", "avx512vnni", "amx", "amxbf16")
        assert "avx2" in kernels._supported_isas()
    else:
        assert not kernels.available()
        assert kernels.unavailable_reason()
        assert kernels.isa() is None


# Each instruction set's /proc/cpuinfo flags (Linux lists a flag only where the OS supports it).
NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avxvnni": {"avx2", "avx_vnni"},
    "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "amx": {"avx512_vnni", "amx_tile", "amx_int8"},
    "amxbf16": {"avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx512_bf16"},
}


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return None if line is None else set(line.split(":", 1)[1].split())


def test_instruction_sets_match_the_kernel_s_cpu_flags():
    """Each instruction set the library offers is one the CPU has, as Linux reports it; they are
    not nested (AMD Zen 4 has AVX-512 VNNI but not AVX-VNNI), and one the CPU lacks is refused
    rather than run (it would end the process with an illegal instruction)."""
    if not EXPECT_KERNEL:
        assert kernels._supported_isas() == []
        return
    flags = _cpuinfo_flags()
    if flags is None:  # not Linux: nothing to compare with but the refusals
        flags = set().union(*[NEEDS[name] for name in kernels._supported_isas()])
    needs = NEEDS
    supported = kernels._supported_isas()
    assert kernels.isa() == supported[-1]
    try:
        for name, flags_needed in needs.items():
            if name in supported:
                assert flags_needed <= flags, (name, flags_needed - flags)
                kernels._set_isa(name)
                assert kernels.isa() == name
            else:
                with pytest.raises(ValueError, match=name):
                    kernels._set_isa(name)
    finally:
        kernels._set_isa(None)
    # avx_vnni is only compiled in with a new enough compiler, AMX only as well; the rest must
    # be offered wherever the CPU has it.
    for name in ("avx2", "avx512vnni"):
        assert (name in supported) == (needs[name] <= flags), name


def test_fallback_where_the_kernel_cannot_load(monkeypatch, caplog):
    """As on an aarch64 machine: available() is False, the reason is logged once, and
    block_matmul is block_matmul_reference (this machine's library state is restored after)."""
    saved = dict(kernels._state)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    kernels._state.clear()
    try:
        with caplog.at_level("INFO", logger="shardinfer"):
            assert not kernels.available() and not kernels.available()
        assert "x86-64 only" in kernels.unavailable_reason()
        assert sum("x86-64 only" in r.getMessage() for r in caplog.records) == 1
        x, qs, d, m = random_problem("q4_1", 2, 5, 64)
        np.testing.assert_array_equal(
            np.asarray(kernels.block_matmul(x, qs, d, m, "q4_1")),
            np.asarray(kernels.block_matmul_reference(x, qs, d, m, "q4_1")),
        )
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


# ---- x rounding --------------------------------------------------------------------------------


def _rounding_cases(k=96):
    x = RNG.standard_normal((6, k)).astype(np.float32) * 3
    x[1] *= 1e4  # large values
    x[2, :32] = 0.0  # a zero block
    # exact halves: dx = 2 (max 254), so x = 2q with q = k + 0.5 -> x odd integers
    x[3, :32] = np.arange(-31, 33, 2, dtype=np.float32)
    x[3, 0] = 254.0
    x[3, 32:64] = -np.arange(-31, 33, 2, dtype=np.float32)
    x[3, 32] = -254.0
    # dx = 1 and halves: +-(k + 0.5)
    x[4, :32] = np.linspace(-20.5, 20.5, 32).astype(np.float32)
    x[4, 0] = 127.0
    x[5, :32] = 1e-3  # a constant block: every element rounds to 127
    return x


def test_native_rounding_matches_numpy(each_isa):
    if not EXPECT_KERNEL:
        assert not kernels.available()
        return
    x = np.concatenate([_rounding_cases(), RNG.standard_normal((40, 96)).astype(np.float32)])
    xq_ref, dx_ref = np_quantize(x)
    for isa in each_isa:
        _use(isa)
        xq, dx = kernels._quantize_x_native(x)
        np.testing.assert_array_equal(xq.reshape(xq_ref.shape), xq_ref, err_msg=isa)
        np.testing.assert_array_equal(dx, dx_ref, err_msg=isa)
    # Row 3's first block: x / dx = odd / 2, all exact halves, rounded away from zero (numpy's
    # np.round, half to even, would differ).
    halves = x[3, 1:32] / 2.0
    away = np.sign(halves) * np.floor(np.abs(halves) + 0.5)
    np.testing.assert_array_equal(xq_ref[3, 0, 1:], away)
    assert not np.array_equal(np.round(halves), away)


def test_reference_rounding_matches_numpy():
    x = np.concatenate([_rounding_cases(), RNG.standard_normal((40, 96)).astype(np.float32)])
    xq_ref, dx_ref = np_quantize(x)
    xq, dx = jax.jit(kernels.quantize_x_reference)(x)
    np.testing.assert_array_equal(np.asarray(xq).astype(np.int64), xq_ref)
    np.testing.assert_array_equal(np.asarray(dx), dx_ref)


# ---- the kernel against numpy ------------------------------------------------------------------

# Every N, K and M of interest appears; M includes batches that are not a multiple of the tile
# (2 x rows) and N ones that are not a multiple of 4 or 8 (the row tile and thread chunks).
SHAPES = [
    (1, 1, 32),
    (1, 3, 64),
    (1, 17, 96),  # K/32 odd: the last block pair is a single block
    (1, 192, 576),
    (1, 577, 576),
    (2, 17, 288),  # 9 blocks: one full group of 8 and a single
    (3, 192, 64),
    (5, 3, 576),
    (8, 577, 32),
    (13, 17, 576),
    (32, 192, 288),
    (32, 577, 576),  # large enough to be split across threads
]


# M around and above the tile sizes (4 or 8 rows, 256-row chunks of x), N around the 8-row
# weight panels (odd: a partial last panel), K with a block count that is not a multiple of 8.
ROW_TILED_SHAPES = [
    (15, 37, 96),
    (16, 8, 576),
    (17, 13, 576),
    (63, 9, 160),
    (64, 37, 576),
    (65, 7, 1536),
    (200, 23, 96),
    (513, 17, 160),
]


def _row_paths(isa):
    """(name, row_tiled) for each path a call can take: the row-tiled path pinned, the choice
    by rows, the few-rows (decode) tiles pinned."""
    return [("row-tiled", True), ("by rows", None), ("few rows", False)] if isa else [(None, None)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_numpy(fmt, each_isa):
    """Every shape (few rows, and the row-tiled ones) through each path."""
    for m_rows, n, k in SHAPES + ROW_TILED_SHAPES:
        x, qs, d, m = random_problem(fmt, m_rows, n, k)
        for isa in each_isa:
            _use(isa)
            for path, row_tiled in _row_paths(isa):
                ref, mag, rtol = expected(x, qs, d, m, fmt, isa, row_tiled)
                call = jax.jit(partial(kernels.block_matmul, fmt=fmt, row_tiled=row_tiled))
                what = f"{fmt} {isa} {path} M={m_rows} N={n} K={k}"
                check(call(x, qs, d, m), ref, mag, what, rtol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_large_values_and_threads(fmt, each_isa):
    """Large x and weight scales; and small problems forced onto the thread pool."""
    call = jax.jit(partial(kernels.block_matmul, fmt=fmt))
    x, qs, d, m = random_problem(fmt, 3, 577, 576, x_scale=3e4, d_scale=3e3)
    ref, mag, _ = np_block_matmul(x, qs, d, m, fmt)
    for isa in each_isa:
        _use(isa)
        check(call(x, qs, d, m), ref, mag, f"{fmt} {isa} large")
        if isa is not None:
            kernels._set_threads(0, 0)  # every call parallel, in chunks of 8 rows
            check(call(x, qs, d, m), ref, mag, f"{fmt} {isa} threaded")
            stats = kernels._last_call()  # XLA's intra-op pool was there and was asked
            assert stats["pool_threads"] >= 1 and stats["threads"] >= 2, stats
            assert stats["chunks"] > 1, stats
            kernels._set_threads(1, 4096)
            check(call(x, qs, d, m), ref, mag, f"{fmt} {isa} one thread")
            kernels._set_threads(0, 4096)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_weights(fmt, each_isa):
    """q8_0's -128 and 127 everywhere against x at +-127 (the largest int16 pair sums of the
    AVX2 path); q4's nibbles 0 and 15."""
    n, k = 9, 288
    nb = k // 32
    x = np.where(RNG.random((3, k)) < 0.5, 127.0, -127.0).astype(np.float32)
    if fmt == "q8_0":
        qs = np.where(RNG.random((n, nb, 32)) < 0.5, -128, 127).astype(np.int8)
        qs[0] = -128
    else:
        qs = np.where(RNG.random((n, nb, 16)) < 0.5, 0x00, 0xFF).astype(np.uint8)
        qs[0] = 0xFF
    d = np.ones((n, nb), np.float16)
    m = np.full((n, nb), -3.0, np.float16) if fmt == "q4_1" else None
    ref, _, _ = np_block_matmul(x, qs, d, m, fmt)
    call = jax.jit(partial(kernels.block_matmul, fmt=fmt))
    for isa in each_isa:
        _use(isa)
        np.testing.assert_array_equal(np.asarray(call(x, qs, d, m)), ref.astype(np.float32))


# ---- the row-tiled path (prefill: many rows of x) -----------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m_rows, n", [(5, 37), (65, 21)])
def test_kernel_integer_exact(fmt, m_rows, n, each_isa):
    """With every scale 1 (d = 1, dx = 1: each x block's max |x| is 127) and integer m, the whole
    computation is integer and below 2**24: each path must equal the exact sum, including x
    values at exact halves (rounded away from zero), and q8_0's -128 / 127 and q4's 0 / 15
    against x at +-127 (the largest int16 sums of the AVX2 paths)."""
    k = 576
    nb = k // 32
    x, qs, _, _ = random_problem(fmt, m_rows, n, k, zero_blocks=False)
    x = np.round(x * 30).astype(np.float32) + RNG.choice([0.0, 0.5, -0.5], x.shape)
    x = np.clip(x, -126.5, 126.5).astype(np.float32)
    xb = x.reshape(m_rows, nb, 32)
    xb[:, :, 7] = np.where(RNG.random((m_rows, nb)) < 0.5, 127.0, -127.0)
    xb[-4:] = np.where(RNG.random((4, nb, 32)) < 0.5, 127.0, -127.0)  # extremes
    x = xb.reshape(m_rows, k)
    if fmt == "q8_0":
        qs[-3:] = np.where(RNG.random((3, nb, 32)) < 0.5, -128, 127).astype(np.int8)
    else:
        qs[-3:] = np.where(RNG.random((3, nb, 16)) < 0.5, 0x00, 0xFF).astype(np.uint8)
    d = np.ones((n, nb), np.float16)
    m = RNG.integers(-8, 9, (n, nb)).astype(np.float16) if fmt == "q4_1" else None
    xq, dx = np_quantize(x)
    assert np.all(dx == 1.0)
    exact = np.einsum("mbi,nbi->mn", xq, np_weight_ints(qs, fmt))
    if fmt == "q4_1":
        exact = exact + np.einsum("mb,nb->mn", xq.sum(-1), m.astype(np.int64))
    assert np.abs(exact).max() < 2**24
    # The AMX-BF16 path takes x as it is (integers and halves below 2^8: exact in bfloat16),
    # the weight as integers (exact in hi): every partial sum is a multiple of 1/2 below 2^23.
    w = np_dequantize(qs, d, m, fmt).reshape(n, k).astype(np.float64)
    exact_bf16 = np.einsum("mk,nk->mn", x.astype(np.float64), w)
    assert np.abs(exact_bf16).max() < 2**22
    for isa in each_isa:
        _use(isa)
        for path, row_tiled in _row_paths(isa):
            call = jax.jit(partial(kernels.block_matmul, fmt=fmt, row_tiled=row_tiled))
            y = np.asarray(call(x, qs, d, m))
            want = exact_bf16 if takes_bf16_path(isa, row_tiled, m_rows) else exact
            np.testing.assert_array_equal(y, want.astype(np.float32), err_msg=f"{fmt} {isa} {path}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_tiled_path_threads(fmt, each_isa):
    """The row-tiled path split over the pool in 8-row chunks (N odd: a partial last panel)."""
    x, qs, d, m = random_problem(fmt, 70, 77, 192)
    call = jax.jit(partial(kernels.block_matmul, fmt=fmt))
    for isa in each_isa:
        _use(isa)
        ref, mag, rtol = expected(x, qs, d, m, fmt, isa, True)
        if isa is None:
            check(call(x, qs, d, m), ref, mag, f"{fmt} fallback", rtol)
            continue
        kernels._set_gemm_min_rows(1)
        kernels._set_threads(0, 0)
        check(call(x, qs, d, m), ref, mag, f"{fmt} {isa} row-tiled threaded", rtol)
        stats = kernels._last_call()
        assert stats["threads"] >= 2 and stats["chunks"] > 1, stats
        kernels._set_threads(0, 4096)


def test_raw_entry_matches_ffi_call():
    """The plain C entry (benchmarks) computes what the FFI handler computes, bit for bit."""
    if not EXPECT_KERNEL:
        assert not kernels.available()
        return
    for fmt in FORMATS:
        x, qs, d, m = random_problem(fmt, 3, 37, 288)
        y = np.zeros((3, 37), np.float32)
        kernels._matmul_raw(
            x.ctypes.data, 3, 9, qs.ctypes.data, d.ctypes.data,
            None if m is None else m.ctypes.data, 37, y.ctypes.data, fmt,
        )  # fmt: skip
        np.testing.assert_array_equal(y, np.asarray(kernels.block_matmul(x, qs, d, m, fmt)))


# ---- the XLA reference -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_matches_numpy(fmt):
    call = jax.jit(partial(kernels.block_matmul_reference, fmt=fmt))
    for m_rows, n, k in [(1, 17, 96), (5, 192, 576), (13, 3, 32), (2, 577, 288), (20, 9, 544)]:
        x, qs, d, m = random_problem(fmt, m_rows, n, k)
        ref, mag, _ = np_block_matmul(x, qs, d, m, fmt)
        check(call(x, qs, d, m), ref, mag, f"reference {fmt} M={m_rows} N={n} K={k}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_gives_the_kernels_bits(fmt, each_isa):
    """The XLA twin, jitted, is bit for bit each kernel path (by rows, few rows, row-tiled) on
    every instruction set: block counts from 1 to 48 (lanes with no block, one, several), rows
    below and past the row-tiled path's 16 and AMX's tiles of 16, weight rows not a multiple
    of 16. (Without the kernels, block_matmul is the
    twin: the check still runs, trivially.) The AMX-BF16 row-tiled path has other math (x in
    bfloat16) and no bit twin: there it is checked against its numpy model, and its rows
    against themselves computed alone (the bits a row must keep in any batch)."""
    shapes = [(1, 17, 32), (3, 8, 288), (5, 192, 576), (17, 33, 544), (20, 40, 1536)]
    # 530 rows: past the AMX path's 512-row chunk of packed x.
    for m_rows, n, k in [*shapes, (530, 24, 96)]:
        x, qs, d, m = random_problem(fmt, m_rows, n, k)
        for row_tiled in (None, False, True):
            ref = jax.jit(partial(kernels.block_matmul_reference, fmt=fmt, row_tiled=row_tiled))
            want = np.asarray(ref(x, qs, d, m))
            for isa in each_isa:
                _use(isa)
                got = np.asarray(kernels.block_matmul(x, qs, d, m, fmt, row_tiled))
                what = f"{fmt} {isa} row_tiled={row_tiled} M={m_rows} N={n} K={k}"
                if takes_bf16_path(isa, row_tiled, m_rows):
                    ref, mag, rtol = expected(x, qs, d, m, fmt, isa, row_tiled)
                    check(got, ref, mag, what, rtol)
                    last = np.asarray(kernels.block_matmul(x[-1:], qs, d, m, fmt, True))
                    np.testing.assert_array_equal(got[-1:], last, err_msg=what)
                else:
                    np.testing.assert_array_equal(got, want, err_msg=what)


def test_reference_and_kernel_accept_leading_axes():
    x, qs, d, m = random_problem("q4_1", 6, 17, 64)
    ref, mag, _ = np_block_matmul(x, qs, d, m, "q4_1")
    for fn in (kernels.block_matmul, kernels.block_matmul_reference):
        y = fn(x.reshape(2, 3, 64), qs, d, m, "q4_1")
        assert y.shape == (2, 3, 17)
        check(np.asarray(y).reshape(6, 17), ref, mag * 2, fn.__name__)


def test_dequantized_twin_matches_numpy():
    """What GPUs and TPUs run: one float32 dot of the dequantized weight (it rounds each
    weight once more, beside |m| which `mag`'s block terms do not count: 10x for it)."""
    for fmt in FORMATS:
        x, qs, d, m = random_problem(fmt, 6, 17, 96)
        ref, mag, _ = np_block_matmul(x, qs, d, m, fmt)
        y = jax.jit(partial(kernels.block_matmul_dequantized, fmt=fmt))(x, qs, d, m)
        check(np.asarray(y), ref, mag * 10, f"dequantized {fmt}")


# ---- under jit, vmap and shard_map -------------------------------------------------------------


def test_kernel_in_jitted_graph_and_lowered_as_ffi_call():
    x, qs, d, m = random_problem("q8_0", 3, 64, 576)
    ref, mag, _ = np_block_matmul(x, qs, d, m, "q8_0")

    @jax.jit
    def f(x, qs, d):
        return jnp.tanh(kernels.block_matmul(x * 2.0, qs, d, None, "q8_0")) + 1.0

    ref2, mag2, _ = np_block_matmul(x * 2, qs, d, m, "q8_0")
    y = np.asarray(f(x, qs, d))
    np.testing.assert_allclose(y, np.tanh(ref2) + 1.0, rtol=0, atol=1e-5 * (mag2.max() + 1))
    hlo = f.lower(x, qs, d).as_text()
    if EXPECT_KERNEL:
        assert "shardinfer_gguf_q8_0_matmul" in hlo
    check(kernels.block_matmul(x, qs, d, None, "q8_0"), ref, mag)


def test_kernel_under_vmap():
    x, qs, d, m = random_problem("q4_0", 12, 33, 96)
    xs = x.reshape(4, 3, 96)
    ys = jax.vmap(lambda xi: kernels.block_matmul(xi, qs, d, None, "q4_0"))(xs)
    ref, mag, _ = np_block_matmul(x, qs, d, m, "q4_0")
    check(np.asarray(ys).reshape(12, 33), ref, mag, "vmap")


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_in_shard_map_splitting_n(fmt):
    """Each of 8 devices multiplies by its own N/8 rows: the same numbers as one call."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("model",))
    m_rows, n, k = 3, 8 * 24, 576
    x, qs, d, m = random_problem(fmt, m_rows, n, k)
    rows = PartitionSpec("model")
    weights = (qs, d) if m is None else (qs, d, m)
    weights = tuple(jax.device_put(w, NamedSharding(mesh, rows)) for w in weights)

    def local(x, *w):
        return kernels.block_matmul(x, w[0], w[1], w[2] if len(w) > 2 else None, fmt)

    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), *([rows] * len(weights))),
            out_specs=PartitionSpec(None, "model"),
        )
    )
    y = sharded(x, *weights)
    assert y.shape == (m_rows, n)
    whole = kernels.block_matmul(x, qs, d, m, fmt)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(whole))
    ref, mag, _ = np_block_matmul(x, qs, d, m, fmt)
    check(y, ref, mag, f"shard_map {fmt}")


# ---- argument checks ---------------------------------------------------------------------------


def test_bad_arguments_are_refused():
    x, qs, d, m = random_problem("q4_1", 2, 5, 64)
    with pytest.raises(ValueError, match="fmt"):
        kernels.block_matmul(x, qs, d, m, "q5_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.block_matmul(x[:, :48], qs, d, m, "q4_1")
    with pytest.raises(ValueError, match="m must be"):
        kernels.block_matmul(x, qs, d, None, "q4_1")
    with pytest.raises(ValueError, match="no m"):
        kernels.block_matmul(x, qs, d, m, "q4_0")
    with pytest.raises(TypeError, match="qs must be int8"):
        kernels.block_matmul(x, np.zeros((5, 2, 32), np.uint8), d, None, "q8_0")
    with pytest.raises(ValueError, match="qs must be"):
        kernels.block_matmul(x, qs.reshape(5, 1, 32), d, m, "q4_1")
    with pytest.raises(ValueError, match="d must be"):
        kernels.block_matmul(x, qs, d.astype(np.float32), m, "q4_1")


def test_kernel_in_shard_map_on_a_data_model_mesh():
    """x split over "data", the weight over "model": each device its own block of y."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    fmt, m_rows, n, k = "q4_1", 6, 4 * 20, 288
    x, qs, d, m = random_problem(fmt, m_rows, n, k)
    rows = NamedSharding(mesh, PartitionSpec("model"))
    w = [jax.device_put(a, rows) for a in (qs, d, m)]
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    sharded = jax.jit(
        jax.shard_map(
            lambda x, qs, d, m: kernels.block_matmul(x, qs, d, m, fmt),
            mesh=mesh,
            in_specs=(PartitionSpec("data"), *([PartitionSpec("model")] * 3)),
            out_specs=PartitionSpec("data", "model"),
        )
    )
    y = sharded(xs, *w)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(kernels.block_matmul(x, qs, d, m, fmt)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_pinned_path_gives_a_row_the_same_bits_whatever_rows_share_the_call(fmt, each_isa):
    """row_tiled=True / False: each row of a call of 1..65 rows is bit for bit that row alone
    (what keeps a request's tokens independent of its batch and mesh); left to choose by the
    rows (None), the two paths add the blocks in different orders. Without the kernels the
    XLA fallback follows the same paths."""
    x, qs, d, m = random_problem(fmt, 65, 40, 32 * 18)
    args = (jnp.asarray(qs), jnp.asarray(d), None if m is None else jnp.asarray(m), fmt)
    if not EXPECT_KERNEL:
        for row_tiled in (None, False, True):
            y = np.asarray(kernels.block_matmul(jnp.asarray(x), *args, row_tiled))
            fallback = kernels.block_matmul_reference(jnp.asarray(x), *args, row_tiled)
            np.testing.assert_array_equal(y, np.asarray(fallback))
        return
    for isa in each_isa:
        _use(isa)
        for row_tiled in (False, True):
            alone = np.asarray(kernels.block_matmul(jnp.asarray(x[:1]), *args, row_tiled))
            for rows in (2, 15, 16, 17, 65):
                shared = np.asarray(kernels.block_matmul(jnp.asarray(x[:rows]), *args, row_tiled))
                np.testing.assert_array_equal(shared[:1], alone, err_msg=f"{isa} {rows}")
        # Pinned to the decode tiles, 32+ rows run the row-tiled loops in the tiles' order:
        # every row the tiles' bits (here forced back onto the tiles for the comparison).
        loops = np.asarray(kernels.block_matmul(jnp.asarray(x), *args, False))
        kernels._set_decode_gemm_min_rows(10**9)
        try:
            tiles = np.asarray(kernels.block_matmul(jnp.asarray(x), *args, False))
        finally:
            kernels._set_decode_gemm_min_rows(-1)
        np.testing.assert_array_equal(loops, tiles, err_msg=f"{isa} decode order")


# ---- several weights in one call -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_weights_in_one_call_give_each_ones_bits(fmt, each_isa):
    """block_matmul_many (a layer's q, k, v in one call, x rounded once): each result is bit
    for bit that weight alone, on every path and instruction set, threaded or not, with
    weights of different heights (one not a multiple of 16)."""
    k = 288
    weights = [random_problem(fmt, 1, n, k)[1:] for n in (64, 16, 37)]
    for m_rows in (1, 5, 40):
        x = random_problem(fmt, m_rows, 1, k)[0]
        for isa in each_isa:
            _use(isa)
            for path, row_tiled in _row_paths(isa):
                alone = [np.asarray(kernels.block_matmul(x, *w, fmt, row_tiled)) for w in weights]
                for threads in (0, 1):
                    if isa is not None:
                        kernels._set_threads(threads, 0)
                    many = jax.jit(partial(kernels.block_matmul_many, fmt=fmt, row_tiled=row_tiled))
                    got = many(x, weights)
                    assert len(got) == len(weights)
                    what = f"{isa} {path} M={m_rows}"
                    for y, want in zip(got, alone, strict=True):
                        np.testing.assert_array_equal(np.asarray(y), want, err_msg=what)
                if isa is not None:
                    kernels._set_threads(0, 4096)
    lowered = jax.jit(partial(kernels.block_matmul_many, fmt=fmt)).lower(x, weights).as_text()
    if kernels.available():  # one custom call for the three weights
        assert lowered.count(f"shardinfer_gguf_{fmt}_matmul_many") == 1, lowered


def test_many_weights_refuses_what_cannot_share_x():
    x, qs, d, m = random_problem("q4_1", 3, 8, 64)
    with pytest.raises(ValueError, match="at least one weight"):
        kernels.block_matmul_many(x, [], "q4_1")
    _, qs2, d2, _ = random_problem("q4_1", 1, 8, 96)  # another K
    with pytest.raises(ValueError, match="qs must be"):
        kernels.block_matmul_many(x, [(qs, d, m), (qs2, d2, m)], "q4_1")
    with pytest.raises(ValueError, match="m must be"):
        kernels.block_matmul_many(x, [(qs, d, None)], "q4_1")
