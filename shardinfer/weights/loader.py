"""Abstract first: fill an abstract parameter tree tensor by tensor, straight into its shards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx

from shardinfer.models.weights import quantize_int8
from shardinfer.sharding import Sharder

log = logging.getLogger("shardinfer")


class TensorRef(NamedTuple):
    """Where a parameter comes from: a family's name map (`hf_tensor(path, cfg)`) gives one."""

    name: str  # the Hugging Face tensor name
    shape: tuple[int, ...]  # its shape there
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours (a view where it can)


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
    abstract_state: nnx.State,
    sharder: Sharder,
    source: TensorSource,
    cfg: Any,
    dtype,
    hf_tensor: Callable[[tuple, Any], TensorRef],
) -> nnx.State:
    """Each parameter read from `source` and placed so that every device gets only its slice;
    `hf_tensor` (the model family's name map) says which checkpoint tensor each one is.

    The host holds one checkpoint tensor at a time (for a stacked layer parameter, that tensor
    of every layer) besides what is placed. An int8 weight is quantized on the host from its
    float tensor. (Reading the next tensors in worker threads while placing measured no faster
    here: with the slices aligned, placing costs nothing on CPU.)
    """
    leaves = dict(nnx.to_flat_state(abstract_state))
    # One task per checkpoint tensor: both halves of an int8 weight come from the same one.
    tasks: dict[tuple, list[tuple]] = {}
    for path, var in leaves.items():
        key = path[:-1] if getattr(var, "contract", None) is not None else path
        tasks.setdefault(key, []).append(path)

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

    def host_slices(key: tuple) -> dict[tuple, dict[tuple, np.ndarray]]:
        """For each leaf of this task: its slice for every local device, keyed by index."""
        paths = tasks[key]
        if paths == [key]:
            values = {key: (read(key), dtype)}
        else:  # an Int8Weight: quantize the float tensor once for "q" and "scale"
            contract = leaves[paths[0]].contract
            q, scale = quantize_int8(np.asarray(read(key), np.float32), contract)
            values = {(*key, "q"): (q, q.dtype), (*key, "scale"): (scale, scale.dtype)}
        out = {}
        for path, (array, target_dtype) in values.items():
            indices = shardings[path].addressable_devices_indices_map(array.shape).values()
            out[path] = {_index_key(i): _placeable(array[i], target_dtype) for i in indices}
        return out

    shardings = dict(nnx.to_flat_state(param_shardings(abstract_state, sharder)))
    placed: dict[tuple, jax.Array] = {}
    for key in tasks:
        for path, slices in host_slices(key).items():
            shape = leaves[path].get_value().shape
            placed[path] = jax.make_array_from_callback(
                shape, shardings[path], lambda index, s=slices: s[_index_key(index)]
            )
    return nnx.map_state(lambda path, var: var.replace(placed[path]), abstract_state)


def _index_key(index: tuple) -> tuple:
    """A device's index (a tuple of slices, unhashable before Python 3.12) as a dict key."""
    return tuple((s.start, s.stop, s.step) for s in index)


# XLA:CPU uses a host array in place, without copying it, when it starts on a 64-byte boundary
# (numpy aligns large arrays to 16 bytes only): this saves a second copy of every weight.
_ALIGN = 64


def _placeable(array: np.ndarray, dtype) -> np.ndarray:
    """`array` in `dtype`, C-contiguous and 64-byte aligned: copied only when it is not, or
    when it is read-only (a view of the user's memory-mapped checkpoint file, which the
    device array would otherwise keep using)."""
    dtype = np.dtype(dtype)
    ready = array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
    if ready and array.ctypes.data % _ALIGN == 0:
        return array
    raw = np.empty(array.nbytes // array.itemsize * dtype.itemsize + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + raw.size - _ALIGN].view(dtype).reshape(array.shape)
    out[...] = array
    return out
