"""XLA compiler options for the engine's programs, by platform."""

from __future__ import annotations

from typing import Any


def step_compiler_options(platform: str) -> dict[str, Any] | None:
    """Options for the prefill and decode programs (and their helpers) on `platform`.

    On CPU, YNNPACK fusions are turned off. XLA:CPU hands dots, reductions and elementwise
    chains to YNNPACK, and each such fusion plans itself on the program's first run: with 30
    unrolled layers that first run took 0.5 s instead of 0.1 s (a third of a warm start's
    first prefill), while steady-state decode measured the same with XLA's own kernels.
    """
    if platform == "cpu":
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return None
