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

    The host holds one parameter at a time (for a stacked layer parameter, that tensor of every
    layer). An int8 weight is quantized on the host from its float tensor, then placed.
    """
    quantized: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # both halves of one weight

    def read_one(path: tuple) -> np.ndarray:
        ref = hf_tensor(path, cfg)
        if ref.name not in source:
            raise ValueError(f"checkpoint has no tensor {ref.name!r}, which the config needs")
        raw = source.get(ref.name)
        if tuple(raw.shape) != ref.shape:
            raise ValueError(
                f"tensor {ref.name!r} has shape {tuple(raw.shape)} in the checkpoint, but the "
                f"config needs {ref.shape}"
            )
        return ref.to_ours(raw)

    def read(path: tuple) -> np.ndarray:
        if path[0] != "layers" or isinstance(path[1], int):  # not stacked (or one layer's)
            return read_one(path)
        # A stacked layer parameter: the same tensor of every layer, in order.
        return np.stack([read_one(("layers", i, *path[1:])) for i in range(cfg.num_layers)])

    def one(path, var):
        contract = getattr(var, "contract", None)
        if contract is None:
            ours, target_dtype = read(path), dtype
        else:  # an Int8Weight's "q" or "scale": quantize the float tensor once for both
            base = path[:-1]
            if base not in quantized:
                quantized[base] = quantize_int8(np.asarray(read(base), np.float32), contract)
            q, scale = quantized[base]
            if path[-1] == "scale":
                del quantized[base]
            ours = q if path[-1] == "q" else scale
            target_dtype = ours.dtype
        shape = var.get_value().shape
        what = ".".join(map(str, path))
        sharding = sharder.sharding(var.logical_axes, shape, what)
        array = jax.make_array_from_callback(
            shape, sharding, lambda index: np.asarray(ours[index]).astype(target_dtype, copy=False)
        )
        return var.replace(array)

    return nnx.map_state(one, abstract_state)
