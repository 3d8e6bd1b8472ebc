"""Moving a parameter tree between the two layer loops (`LAYER_LOOPS` in models/interface.py).

Checkpoints always hold the stacked ("scan") form, whatever loop the process that wrote them
ran, so a checkpoint saved on a CPU (unrolled) restores on an accelerator (scan) and back.
Each conversion is one jitted copy straight into the target's shardings; for that moment the
layer weights exist twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def convert_layers(state: nnx.State, target: nnx.State, target_shardings: nnx.State) -> nnx.State:
    """`state` (either form) rebuilt in the form of the abstract `target` tree."""
    source = nnx.to_pure_dict(state)
    wanted = nnx.to_pure_dict(target)
    if "layers" not in source:  # a family without per-layer parameters: one form only
        return state
    stacked_source = not _is_per_layer(source["layers"])
    stacked_target = not _is_per_layer(wanted["layers"])
    if stacked_source == stacked_target:
        return state

    def rebuild(pure: dict) -> dict:
        layers = pure["layers"]
        if stacked_target:
            per_layer = [layers[i] for i in range(len(layers))]
            layers = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        else:
            count = jax.tree.leaves(layers)[0].shape[0]
            layers = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)}
        return {**pure, "layers": layers}

    out_shardings = nnx.to_pure_dict(target_shardings)
    converted = jax.jit(rebuild, out_shardings=out_shardings)(source)
    result = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(result, converted)
    return result


def _is_per_layer(layers: dict) -> bool:
    return all(isinstance(key, int) for key in layers)
