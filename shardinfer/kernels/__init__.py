"""CPU matmul kernels for GGUF's block formats (q8_0, q4_0, q4_1), called from JAX via jax.ffi.

`block_matmul(x, qs, d, m, fmt)` is ``x @ w.T`` for a weight ``w`` [N, K] kept in GGUF's blocks of
32 along K, computed as llama.cpp computes it: each 32-block of each row of ``x`` is rounded to
int8 with its own float32 scale, the block dots are exact int32, and the float terms per block
are added in a fixed order per path. `block_matmul_reference`, its XLA (jnp) twin, adds them in
the same order: on CPU the two give the same bits (what CPUs without the kernels run).

Layouts (one plane per field; ``nb = K // 32``):

- ``"q8_0"``: ``qs`` int8 [N, nb, 32], ``d`` float16 [N, nb], ``m`` None; ``w = d * qs``.
- ``"q4_0"``: ``qs`` uint8 [N, nb, 16], ``d`` float16 [N, nb], ``m`` None; byte i of a block holds
  element i in its low nibble and element i + 16 in its high nibble; ``w = d * (nibble - 8)``.
- ``"q4_1"``: ``qs`` as q4_0, ``d`` and ``m`` float16 [N, nb]; ``w = d * nibble + m``.

Rounding of x, the same in the kernel, in `quantize_x_reference` and in the tests: per block
``dx = max|x| / 127`` (float32 division), ``xq = x / dx`` (float32 division) rounded half away
from zero (``trunc(q) + sign(q)`` where ``|q - trunc(q)| >= 0.5``), clipped to [-127, 127]; a
block with ``max|x| == 0`` has ``dx = 0`` and ``xq = 0``. ``dx`` stays float32 (llama.cpp stores
it as float16 in its q8_0 blocks; keeping float32 is slightly more accurate). Then

    y[m, n] = sum_b d[n, b] * dx[m, b] * sum_i wq[n, b, i] * xq[m, b, i]
              (+ sum_b m[n, b] * dx[m, b] * sum_i xq[m, b, i]   for q4_1)

with ``wq = qs`` (q8_0) or ``nibble - 8`` (q4_0) or ``nibble`` (q4_1).

Two paths compute that same math: with few rows of x (decode, M < 16) tiles of 4 weight rows x
2 x rows that read each weight block once per call; with 16 or more (prefill) a row-tiled path
that unpacks 8 weight rows at a time into the layout of the int8 dot instruction (AVX-512 /
AVX-VNNI ``vpdpbusd``, AVX2 ``maddubs``) once and uses them against every row of x, so the
unpacking is paid once per panel, not once per pair of x rows (on CPUs with AMX-INT8, 16
weight rows at a time on AMX tiles, with the same bits). Both compute every block dot exactly;
the row-tiled path adds the per-block float terms block after block, the decode tiles in 8
lanes (blocks b mod 8) that are summed at the end, so a row's last bits depend on the path.

On CPUs with AMX-BF16 and AVX512-BF16 (`isa()` "amxbf16") the row-tiled path computes other
math, about 2x faster there: x rounded to bfloat16 (not to int8 blocks), each weight block
dequantized to float32 and split into two bfloat16s (hi + lo, within 2^-17 of it), summed
over all of K in float32 on the tiles (gguf_matmul_amx_bf16.h). It is closer to the float32
model than the int8 blocks (SmolLM2's prefill logits: KL 0.0001 against 0.005) and a row's
bits still depend only on that row, but it has no bit twin here: `block_matmul_reference`
follows the int8-block paths.

Threads: each call splits N over XLA's intra-op thread pool (and the calling thread) when it has
at least 4096 block dots (N * K/32 * M); `set_threads(n)` caps the threads per call (1: the
calling thread only, better on a machine whose cores are busy with other work; the command
line's --kernel-threads).

The kernel is a compiled library built when the package is installed (setup.py); `available()`
says whether it loaded here (x86-64 with AVX2, FMA and F16C). `block_matmul` uses it on CPU
devices when available, `block_matmul_reference` on CPU devices otherwise, and
`block_matmul_dequantized` (one float32 dot, the faster form for matrix units) on other
platforms, so it is always safe to call; `available()` tells which path CPU devices get.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import math
import platform
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMATS",
    "available",
    "block_matmul",
    "block_matmul_many",
    "block_matmul_reference",
    "isa",
    "quantize_x_reference",
    "set_threads",
    "unavailable_reason",
]

log = logging.getLogger("shardinfer")

BLOCK = 32
# format -> (FFI target, library symbol, qs dtype, bytes of qs per block, has m)
_FORMATS = {
    "q8_0": ("shardinfer_gguf_q8_0_matmul", "ShardinferGgufQ8_0Matmul", np.int8, 32, False),
    "q4_0": ("shardinfer_gguf_q4_0_matmul", "ShardinferGgufQ4_0Matmul", np.uint8, 16, False),
    "q4_1": ("shardinfer_gguf_q4_1_matmul", "ShardinferGgufQ4_1Matmul", np.uint8, 16, True),
}
# Several weights against one x in one call (block_matmul_many): target "<single>_many",
# library symbol "<single>Many".
FORMATS = tuple(_FORMATS)
_ISA_NAMES = {1: "avx2", 2: "avxvnni", 3: "avx512vnni", 4: "amx", 5: "amxbf16"}
_GEMM_MIN_ROWS = 16  # gguf_matmul.cc kGemmMinRowsDefault: row_tiled=None picks by this
# attention.cc's two handlers, used by attention.py.
ATTENTION_TARGET = "shardinfer_prefill_attention"
DECODE_ATTENTION_TARGET = "shardinfer_decode_attention"

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None, "why": str | None


def _library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_gguf_matmul{suffix}"
        if path.is_file():
            return path
    return None


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why, level = None, None, logging.INFO
        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            why = f"GGUF block kernels are x86-64 only (this is {machine or 'unknown'})"
        elif (path := _library_path()) is None:
            why = (
                "GGUF block kernels not built (no compiled library next to "
                f"{Path(__file__).name}: a C++ compiler is needed at install time)"
            )
            level = logging.WARNING
        else:
            try:
                lib = ctypes.CDLL(str(path))
                lib.ShardinferGgufIsa.restype = ctypes.c_int
                lib.ShardinferGgufBestIsa.restype = ctypes.c_int
                lib.ShardinferGgufSupportedIsas.restype = ctypes.c_uint
                lib.ShardinferGgufSetIsa.argtypes = [ctypes.c_int]
                lib.ShardinferGgufSetIsa.restype = ctypes.c_int
                lib.ShardinferGgufSetThreads.argtypes = [ctypes.c_int, ctypes.c_longlong]
                lib.ShardinferGgufSetGemmMinRows.argtypes = [ctypes.c_longlong]
                lib.ShardinferGgufSetDecodeGemmMinRows.argtypes = [ctypes.c_longlong]
                lib.ShardinferGgufQuantizeX.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_longlong,
                    ctypes.c_longlong,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                ]
                lib.ShardinferGgufQuantizeX.restype = ctypes.c_int
                i64, ptr = ctypes.c_longlong, ctypes.c_void_p
                lib.ShardinferGgufMatmulRaw.argtypes = [
                    ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr
                ]  # fmt: skip
                lib.ShardinferGgufMatmulRaw.restype = ctypes.c_int
                if lib.ShardinferGgufBestIsa() == 0:
                    why = "GGUF block kernels need AVX2, FMA and F16C, which this CPU lacks"
                    lib = None
                else:
                    targets = [(t, sym) for t, sym, *_ in _FORMATS.values()]
                    targets += [(t + "_many", sym + "Many") for t, sym, *_ in _FORMATS.values()]
                    targets.append((ATTENTION_TARGET, "ShardinferPrefillAttention"))
                    targets.append((DECODE_ATTENTION_TARGET, "ShardinferDecodeAttention"))
                    for target, symbol in targets:
                        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
                    lib.ShardinferAttentionSetIsa.argtypes = [ctypes.c_int]
            except (OSError, AttributeError, ValueError) as e:
                why = f"GGUF block kernels failed to load from {path}: {e}"
                lib, level = None, logging.WARNING
        if why is not None:
            log.log(level, "%s: using the XLA path", why)
        _state["lib"], _state["why"] = lib, why
        return lib


def available() -> bool:
    """Whether the compiled kernels loaded on this machine (x86-64 with AVX2+FMA+F16C).

    The first call loads the library; when it can't, the reason is logged once (logger
    "shardinfer") and is `unavailable_reason()`.
    """
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _state["why"]


def isa() -> str | None:
    """The instruction set the kernels use: "amxbf16" (AVX-512 VNNI, and for many rows AMX
    tiles in bfloat16: other math, see the module docstring), "amx" (AVX-512 VNNI, and AMX
    int8 tiles for many rows, the same bits), "avx512vnni", "avxvnni", "avx2", or None."""
    lib = _load()
    return None if lib is None else _ISA_NAMES.get(lib.ShardinferGgufIsa())


def _set_isa(name: str | None) -> None:
    """Tests and benchmarks: use instruction set `name` (None: the best this CPU has)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    code = (
        lib.ShardinferGgufBestIsa()
        if name is None
        else {v: k for k, v in _ISA_NAMES.items()}.get(name, -1)
    )
    if not lib.ShardinferGgufSetIsa(code):
        raise ValueError(f"instruction set {name!r} is not available on this CPU")


def _supported_isas() -> list[str]:
    lib = _load()
    if lib is None:
        return []
    mask = lib.ShardinferGgufSupportedIsas()  # not nested: Zen 4 has AVX-512 VNNI, no AVX-VNNI
    return [name for code, name in sorted(_ISA_NAMES.items()) if mask & (1 << code)]


def set_threads(n: int = 0) -> None:
    """At most `n` threads per kernel call (0: XLA's intra-op pool and the calling thread, the
    default; 1: the calling thread only). Takes effect for calls from then on; nothing to do
    where the kernels did not load."""
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if available():
        _set_threads(n)


def _set_threads(n: int = 0, min_work: int = -1) -> None:
    """Benchmarks: at most `n` threads per call (0: XLA's intra-op pool + the caller); calls with
    fewer than `min_work` block dots (N * K/32 * M) stay on the calling thread (-1: unchanged;
    the default is 4096)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    lib.ShardinferGgufSetThreads(n, min_work)


def _set_gemm_min_rows(rows: int = -1) -> None:
    """Tests and benchmarks: calls with at least `rows` rows of x take the row-tiled path (-1:
    the default, 16; a huge value forces the decode tiles, the kernel as it was before it)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    lib.ShardinferGgufSetGemmMinRows(rows)


def _set_decode_gemm_min_rows(rows: int = -1) -> None:
    """Tests and benchmarks: calls pinned to the decode tiles (row_tiled=False) with at least
    `rows` rows of x run the row-tiled loops in the tiles' order of sums, the same bits (-1:
    the default, 32; a huge value keeps the tiles whatever the rows)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    lib.ShardinferGgufSetDecodeGemmMinRows(rows)


def _last_call() -> dict:
    """Benchmarks and tests: how the last kernel call (in any thread) used threads."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    out = (ctypes.c_longlong * 4)()
    lib.ShardinferGgufLastCall(out)
    return dict(pool_threads=out[0], threads=out[1], chunks=out[2], own_chunks=out[3])


def _matmul_raw(
    x_ptr: int,
    m_rows: int,
    nb: int,
    qs_ptr: int,
    d_ptr: int,
    m_ptr: int | None,
    n: int,
    y_ptr: int,
    fmt: str,
) -> None:
    """Benchmarks: the kernel on raw row-major buffers, on the calling thread, without XLA."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    code = FORMATS.index(fmt)
    if not lib.ShardinferGgufMatmulRaw(code, x_ptr, m_rows, nb, qs_ptr, d_ptr, m_ptr, n, y_ptr):
        raise ValueError("bad arguments")


def _quantize_x_native(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tests: x float32 [M, K] rounded by the compiled kernel: (xq int8 [M, K], dx [M, K/32])."""
    lib = _load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    x = np.ascontiguousarray(x, dtype=np.float32)
    m_rows, k = x.shape
    xq = np.empty((m_rows, k), np.int8)
    dx = np.empty((m_rows, k // BLOCK), np.float32)
    if not lib.ShardinferGgufQuantizeX(x.ctypes.data, m_rows, k, xq.ctypes.data, dx.ctypes.data):
        raise ValueError(f"K = {k} is not a multiple of {BLOCK}")
    return xq, dx


# ---- the XLA path ------------------------------------------------------------------------------


def _check(x, qs, d, m, fmt: str) -> tuple[int, int, int]:
    """(K, N, nb) after checking shapes and dtypes; raises ValueError or TypeError."""
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    _, _, qs_dtype, qbytes, has_m = _FORMATS[fmt]
    if x.ndim < 1:
        raise ValueError("x must have a last (contracting) axis")
    k = x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"K = {k} is not a multiple of {BLOCK}")
    nb = k // BLOCK
    if qs.ndim != 3 or qs.shape[1:] != (nb, qbytes):
        raise ValueError(f"{fmt}: qs must be [N, {nb}, {qbytes}] for K = {k}, not {qs.shape}")
    n = qs.shape[0]
    if qs.dtype != qs_dtype:
        raise TypeError(f"{fmt}: qs must be {np.dtype(qs_dtype).name}, not {qs.dtype}")
    if d.shape != (n, nb) or d.dtype != jnp.float16:
        raise ValueError(f"{fmt}: d must be float16 [{n}, {nb}], not {d.dtype} {d.shape}")
    if has_m:
        if m is None or m.shape != (n, nb) or m.dtype != jnp.float16:
            got = None if m is None else f"{m.dtype} {m.shape}"
            raise ValueError(f"{fmt}: m must be float16 [{n}, {nb}], not {got}")
    elif m is not None:
        raise ValueError(f"{fmt} has no m; pass m=None")
    return k, n, nb


def quantize_x_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x float32 [..., K] rounded to int8 blocks as the kernel rounds it (module docstring).

    Returns (xq [..., K/32, 32] as float32 holding integers in [-127, 127], dx [..., K/32]).
    """
    x = jnp.asarray(x, jnp.float32)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    # XLA rewrites a / broadcast(b) and a / constant as a * (1 / b), which rounds differently
    # from the division the kernel does; the barriers keep both divisions real divisions.
    dx = amax / jax.lax.optimization_barrier(jnp.full(amax.shape, 127.0, jnp.float32))
    safe = jnp.where(dx == 0, jnp.float32(1.0), dx)
    q = xb / jax.lax.optimization_barrier(jnp.broadcast_to(safe[..., None], xb.shape))
    t = jnp.trunc(q)
    r = t + jnp.where(jnp.abs(q - t) >= 0.5, jnp.sign(q), jnp.float32(0.0))
    return jnp.clip(r, -127.0, 127.0), dx


def _dequantize(qs, d, m, fmt: str) -> jax.Array:
    """The weight as float32 [N, K]."""
    n, nb = d.shape
    w = d.astype(jnp.float32)[..., None] * _weight_ints(qs, fmt).astype(jnp.float32)
    if fmt == "q4_1":
        w = w + m.astype(jnp.float32)[..., None]
    return w.reshape(n, nb * BLOCK)


def _weight_ints(qs, fmt: str) -> jax.Array:
    """The weight's integers per block, int8 [N, nb, 32] (q4_0: nibble - 8, q4_1: nibble)."""
    if fmt == "q8_0":
        return qs
    nibbles = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(jnp.int8)
    return nibbles - 8 if fmt == "q4_0" else nibbles


# The reference's block dots [nb, rows, N] (float32) are made this many bytes at most at a time.
_REFERENCE_CHUNK_BYTES = 64 << 20


def block_matmul_reference(x, qs, d, m, fmt: str, row_tiled: bool | None = None) -> jax.Array:
    """`block_matmul` in plain jnp (XLA), bit for bit the kernel's result on CPU.

    The same rounding of x, the same exact block dots, and the per-block float terms
    added in the order the kernel's path adds them (`row_tiled` as for `block_matmul`): the
    row-tiled path one block after another, the decode tiles in 8 lanes of blocks b mod 8
    that end in a fixed tree. Each step is ``acc = idot * (d * dx) + acc`` (``+ m * sx`` for
    q4_1), which XLA:CPU, like the kernel, computes as one fused multiply-add (the term's
    product written first: LLVM fuses the first operand's multiply). Any platform and
    jit-able; x may be [..., K] (the result is then [..., N]). On GPUs and TPUs
    `block_matmul_dequantized` is the faster twin (one float dot)."""
    k, n, nb = _check(x, qs, d, m, fmt)
    x = jnp.asarray(x, jnp.float32)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if rows == 0:
        return jnp.zeros((*lead, n), jnp.float32)
    tiled = rows >= _GEMM_MIN_ROWS if row_tiled is None else row_tiled
    x2 = x.reshape(rows, k)
    wq = _weight_ints(jnp.swapaxes(qs, 0, 1), fmt).astype(jnp.float32)  # [nb, N, 32]
    dw = d.astype(jnp.float32).T  # [nb, N]
    mw = None if m is None else m.astype(jnp.float32).T

    def rows_of(xc):
        xq, dx = quantize_x_reference(xc)  # [r, nb, 32], [r, nb]
        # [nb, r, N]: integers (|.| < 2^24) exact in float32 whatever order XLA sums a block's
        # 32 products in; a float dot is what XLA:CPU runs fastest.
        idot = jax.lax.dot_general(
            jnp.swapaxes(xq, 0, 1),
            wq,
            (((2,), (2,)), ((0,), (0,))),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        dxt = dx.T[:, :, None]  # [nb, r, 1]
        sxt = None
        if mw is not None:
            sxt = (dx * jnp.sum(xq.astype(jnp.int32), axis=-1).astype(jnp.float32)).T[:, :, None]

        # Every sum starts at a zero XLA cannot see is zero, as the kernel's accumulators start
        # at 0: so each term's product is fused with what it is added to (never left to be
        # fused with whatever adds a lone product next, which the kernel would have rounded).
        zero = dx[:, :1] - dx[:, :1]

        def add_block(acc, b):
            acc = _fma_step(idot[b], dw[b] * dxt[b], acc)
            if mw is not None:
                acc = _fma_step(mw[b], sxt[b], acc)
            return acc

        if tiled:
            acc = zero
            for b in range(nb):
                acc = add_block(acc, b)
            return acc
        lanes = []
        for lane in range(8):  # the decode tiles' lanes [b0 b2 b4 b6 b1 b3 b5 b7]
            acc = jnp.broadcast_to(zero, (xc.shape[0], n))
            for b in range(lane, nb, 8):
                acc = add_block(acc, b)
            lanes.append(acc)
        # Their horizontal sum.
        pairs = [lanes[0] + lanes[1], lanes[2] + lanes[3], lanes[4] + lanes[5], lanes[6] + lanes[7]]
        return (pairs[0] + pairs[2]) + (pairs[1] + pairs[3])

    def all_rows(x2):
        chunk = max(1, _REFERENCE_CHUNK_BYTES // (4 * nb * max(n, 1)))
        if rows <= chunk:
            return rows_of(x2)
        pieces = -(-rows // chunk)
        padded = jnp.pad(x2, ((0, pieces * chunk - rows), (0, 0)))
        return jax.lax.map(rows_of, padded.reshape(pieces, chunk, k)).reshape(-1, n)[:rows]

    return _unfused(all_rows, x2).reshape(*lead, n)


def _unfused(fn, x):
    """fn(x), its result kept whole in memory, as a kernel's is, rather than fused into what
    uses it: LLVM fuses a multiply and an add into one FMA only inside one fusion, so the
    model's ops after the matmul (RoPE, the attention's reductions) would otherwise round as
    they do not beside the kernel. XLA fuses through optimization barriers, but not out of a
    while loop whose trip count it cannot see: this one runs once (twice if x[0, 0] is NaN)."""
    out = jax.eval_shape(fn, x)
    trips = 1 + (x[0, 0] != x[0, 0]).astype(jnp.int32)

    def body(carry):
        i, _ = carry
        return i + 1, fn(x)

    return jax.lax.while_loop(lambda c: c[0] < trips, body,
                              (jnp.int32(0), jnp.zeros(out.shape, out.dtype)))[1]  # fmt: skip


def _fma_step(a, b, acc):
    """a * b + acc, the product first: LLVM fuses the first operand's multiply, as the kernel's
    FMA does."""
    return a * b + acc


def block_matmul_dequantized(x, qs, d, m, fmt: str) -> jax.Array:
    """The same math as one float32 dot (precision HIGHEST) of x rounded as the kernel rounds
    it and the weight dequantized to float32: what GPUs and TPUs run (their matmul units, not
    a loop over blocks); it differs from the kernel only in the order of float sums."""
    k, _, _ = _check(x, qs, d, m, fmt)
    xq, dx = quantize_x_reference(x)
    xd = (xq * dx[..., None]).reshape(*xq.shape[:-2], k)
    w = _dequantize(qs, d, m, fmt)
    return jax.lax.dot_general(
        xd,
        w,
        (((xd.ndim - 1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _varying(a) -> frozenset:
    """The shard_map mesh axes that `a` varies over (empty outside shard_map)."""
    mat = getattr(jax.typeof(a), "mat", None)
    return frozenset(getattr(mat, "varying", None) or ())


_PATHS = {None: 0, False: 1, True: 2}  # gguf_matmul.cc `Path`


def _ffi_call(target: str, result: jax.ShapeDtypeStruct, ops: tuple, **attrs) -> jax.Array:
    """One call of a kernel (sequential under vmap). Inside shard_map an FFI call needs all
    its operands varying over the same mesh axes; its result (from per-device shards) varies
    over them too, which pcast records (a no-op when run)."""
    axes = frozenset().union(*(_varying(a) for a in ops))
    ops = tuple(
        a
        if _varying(a) == axes
        else jax.lax.pcast(a, tuple(sorted(axes - _varying(a), key=str)), to="varying")
        for a in ops
    )
    y = jax.ffi.ffi_call(target, result, vmap_method="sequential")(*ops, **attrs)

    def varying(y):
        if axes and _varying(y) != axes:
            y = jax.lax.pcast(y, tuple(sorted(axes - _varying(y), key=str)), to="varying")
        return y

    return [varying(a) for a in y] if isinstance(result, list) else varying(y)


def _ffi_matmul(ops: tuple, fmt: str, n: int, row_tiled: bool | None) -> jax.Array:
    result = jax.ShapeDtypeStruct((ops[0].shape[0], n), jnp.float32)
    return _ffi_call(_FORMATS[fmt][0], result, ops, path=np.int32(_PATHS[row_tiled]))


def _unpack(ops: tuple) -> tuple:
    return ops[0], ops[1], ops[2], ops[3] if len(ops) > 3 else None


def block_matmul(x, qs, d, m, fmt: str, row_tiled: bool | None = None) -> jax.Array:
    """``x @ w.T`` for a GGUF block weight (module docstring): float32 [M, N] for x [M, K].

    `row_tiled` picks the kernel's path: None by the rows (the row-tiled one from 16), True or
    False that one whatever M. Both compute the math above; their float sums over blocks go in
    different orders, so pin it where a row must come out the same bits however many rows
    share the call (the model does: prefill row-tiled, decode not). `block_matmul_reference`
    follows it too.

    x is float32 [M, K] (any M >= 1; other float dtypes are converted; [..., K] works too and
    gives [..., N]). On CPU devices, with the compiled kernels `available()`, this is one call of
    the FFI kernel (jit-able, usable inside shard_map on local shards, sequential under vmap);
    on CPUs without them `block_matmul_reference` (the same bits), on other platforms
    `block_matmul_dequantized`.
    """
    k, n, _ = _check(x, qs, d, m, fmt)
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    operands = (x2, qs, d) if m is None else (x2, qs, d, m)

    def on_cpu(*ops):
        if not available():
            return block_matmul_reference(*_unpack(ops), fmt, row_tiled)
        return _ffi_matmul(ops, fmt, n, row_tiled)

    def elsewhere(*ops):
        return block_matmul_dequantized(*_unpack(ops), fmt)

    y = jax.lax.platform_dependent(*operands, cpu=on_cpu, default=elsewhere)
    return y.reshape(*lead, n)


def block_matmul_many(x, weights, fmt: str, row_tiled: bool | None = None) -> list[jax.Array]:
    """`block_matmul` of one x against several weights of one format, [(qs, d, m), ...]: a
    list of float32 [M, N_i]. With the kernels, one call: x is rounded (and packed) once for
    all of them and their rows are split over the threads together (a layer's q, k and v, or
    its gate and up). Each result is the bits `block_matmul` gives for that weight alone."""
    if not weights:
        raise ValueError("block_matmul_many needs at least one weight")
    shapes = [_check(x, qs, d, m, fmt) for qs, d, m in weights]
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shapes[0][0])
    flat = [a for qs, d, m in weights for a in ((qs, d) if m is None else (qs, d, m))]
    per = 3 if fmt == "q4_1" else 2

    def split(ops):  # (qs, d, m or None) per weight
        return [(*ops[1 + per * i : 1 + per * (i + 1)], None)[:3] for i in range(len(weights))]

    def on_cpu(*ops):
        if not available():
            return [block_matmul_reference(ops[0], *w, fmt, row_tiled) for w in split(ops)]
        results = [jax.ShapeDtypeStruct((ops[0].shape[0], n), jnp.float32) for _, n, _ in shapes]
        return list(_ffi_call(_FORMATS[fmt][0] + "_many", results, ops,
                              path=np.int32(_PATHS[row_tiled])))  # fmt: skip

    def elsewhere(*ops):
        return [block_matmul_dequantized(ops[0], *w, fmt) for w in split(ops)]

    ys = jax.lax.platform_dependent(x2, *flat, cpu=on_cpu, default=elsewhere)
    return [y.reshape(*lead, n) for y, (_, n, _) in zip(ys, shapes, strict=True)]
