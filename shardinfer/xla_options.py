"""XLA compiler options for the engine's programs, by platform and number format."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def step_compiler_options(platform: str, dtype: Any, quantize: str | None) -> dict[str, Any] | None:
    """Options for the prefill and decode programs (and their helpers).

    On CPU, for float32 matmuls, YNNPACK fusions are turned off. XLA:CPU hands dots, reductions
    and elementwise chains to YNNPACK, and each such fusion plans itself on the program's first
    run: with 30 unrolled layers that first run took 0.5 s instead of 0.1 s (a third of a warm
    start's first prefill), while float32 decode measured the same with XLA's own kernels (and
    faster at batch 8). bfloat16 and int8 dots keep YNNPACK: without it they fell to a slow
    path (int8 batch 1: 3.4 instead of ~30 tok/s).

    GGUF block weights (their matmuls are our kernels) turn it off too: YNNPACK takes a fusion
    or leaves it to XLA by its size, and its exp differs from XLA's in the last bit, so a
    row's softmax changed with the number of rows beside it (and int8 rounding of the next
    activations made that another token). Without it the batch-1 step measured 7.3 instead
    of 8.2 ms. Plain dots alone (no exp or reduction fused to them) still go to YNNPACK
    (`INDIVIDUAL_DOT`): the prefill attention's two dots a layer, 475 -> 449 ms for a
    512-token prompt, with the same bits on every mesh and batch (tests/test_blocks.py).
    """
    blocks = quantize in ("gguf", "q8_0", "q4_0")  # models/weights.py BLOCK_MODES
    if platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and blocks:
        return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    if platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and quantize is None:
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return None
