"""Simulated CPU devices (`--host-devices N`): set before JAX starts its backend.

JAX reads two settings: its own JAX_NUM_CPU_DEVICES (read when jax is imported), which wins
when both are set, and XLA's --xla_force_host_platform_device_count. Both are set, and JAX's
config too if jax is already imported, so a JAX_NUM_CPU_DEVICES left in the environment (a
notebook's, a shell's) never overrides the number asked for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping


def set_host_devices(n: int, environ: MutableMapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    env["JAX_NUM_CPU_DEVICES"] = str(n)
    if environ is None and "jax" in sys.modules:  # jax read the variable when it was imported
        sys.modules["jax"].config.update("jax_num_cpu_devices", n)
