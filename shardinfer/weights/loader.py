"""Abstract first: fill an abstract parameter tree tensor by tensor, straight into its shards."""

from __future__ import annotations

import logging
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from shardinfer.config import ModelConfig
from shardinfer.models.weights import quantize_int8
from shardinfer.sharding import Sharder
from shardinfer.weights.names import hf_tensor

log = logging.getLogger("shardinfer")


class TensorSource(Protocol):
    """Checkpoint tensors by Hugging Face name, as (lazy) numpy arrays in HF layout."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray: ...


def param_shardings(abstract_state: nnx.State, sharder: Sharder) -> nnx.State:
    """The NamedSharding of every parameter, from its logical axes and the rules."""

    def one(path, var):
        what = ".".join(map(str, path))
        return sharder.sharding(var.logical_axes, var.get_value().shape, what)

    return nnx.map_state(one, abstract_state)


def load_params(
    abstract_state: nnx.State, sharder: Sharder, source: TensorSource, cfg: ModelConfig, dtype
) -> nnx.State:
    """Each parameter read from `source` and placed so that every device gets only its slice.

    The host holds at most one tensor at a time (for memory-mapped files, only the slices being
    placed). An int8 weight is quantized on the host from its float tensor, then placed.
    """
    quantized: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # both halves of one weight

    def read(path: tuple) -> tuple[str, np.ndarray]:
        ref = hf_tensor(path, cfg)
        if ref.name not in source:
            raise ValueError(f"checkpoint has no tensor {ref.name!r}, which the config needs")
        raw = source.get(ref.name)
        if tuple(raw.shape) != ref.shape:
            raise ValueError(
                f"tensor {ref.name!r} has shape {tuple(raw.shape)} in the checkpoint, but the "
                f"config needs {ref.shape}"
            )
        return ref.name, ref.to_ours(raw)

    def one(path, var):
        contract = getattr(var, "contract", None)
        if contract is None:
            name, ours = read(path)
            target_dtype = dtype
        else:  # an Int8Weight's "q" or "scale": quantize the float tensor once for both
            base = path[:-1]
            if base not in quantized:
                name, ours = read(base)
                quantized[base] = quantize_int8(np.asarray(ours, np.float32), contract)
            q, scale = quantized[base]
            if path[-1] == "scale":
                del quantized[base]
            name, ours = ".".join(map(str, path)), q if path[-1] == "q" else scale
            target_dtype = ours.dtype
        shape = var.get_value().shape
        sharding = sharder.sharding(var.logical_axes, shape, name)
        array = jax.make_array_from_callback(
            shape, sharding, lambda index: np.asarray(ours[index]).astype(target_dtype)
        )
        return var.replace(array)

    return nnx.map_state(one, abstract_state)
