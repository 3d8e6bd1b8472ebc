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
    """
    if platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and quantize is None:
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return None
