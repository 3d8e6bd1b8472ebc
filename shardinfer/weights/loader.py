"""Abstract first: fill an abstract parameter tree tensor by tensor, straight into its shards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx

from shardinfer.models.blocks import quantize_blocks
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
    # One task per checkpoint tensor: both halves of an int8 weight (all parts of a block
    # weight) come from the same one.
    tasks: dict[tuple, list[tuple]] = {}
    for path, var in leaves.items():
        whole = getattr(var, "contract", None) is None and not _block_format(var)
        tasks.setdefault(path if whole else path[:-1], []).append(path)

    def checked_ref(path: tuple) -> TensorRef:
        ref = hf_tensor(path, cfg)
        if ref.name not in source:
            raise ValueError(f"checkpoint has no tensor {ref.name!r}, which the config needs")
        return ref

    def checked(ref: TensorRef, raw: np.ndarray) -> np.ndarray:
        if tuple(raw.shape) != ref.shape:
            raise ValueError(
                f"tensor {ref.name!r} has shape {tuple(raw.shape)} in the checkpoint, but the "
                f"config needs {ref.shape}"
            )
        return raw

    def read_one(path: tuple) -> np.ndarray:
        ref = checked_ref(path)
        return ref.to_ours(checked(ref, source.get(ref.name)))

    def layers_of(path: tuple, read_layer):
        if path[0] != "layers" or isinstance(path[1], int):  # not stacked (or one layer's)
            return read_layer(path)
        # A stacked layer parameter: the same tensor of every layer, in order.
        each = [read_layer(("layers", i, *path[1:])) for i in range(cfg.num_layers)]
        return jax.tree.map(lambda *xs: np.stack(xs), *each)

    def read_blocks(path: tuple, fmt: str) -> tuple:
        """A block weight's (qs, d, m) in HF [out, in] row order: the file's own blocks when
        they are in `fmt`, else the float tensor quantized to it."""
        ref = checked_ref(path)
        if len(ref.shape) != 2:
            raise ValueError(f"{ref.name}: block formats read [out, in] matmul weights")
        if getattr(source, "block_format", lambda name: None)(ref.name) == fmt:
            return source.blocks(ref.name)
        return quantize_blocks(checked(ref, np.asarray(source.get(ref.name), np.float32)), fmt)

    def host_slices(key: tuple) -> dict[tuple, dict[tuple, np.ndarray]]:
        """For each leaf of this task: its slice for every local device, keyed by index."""
        paths = tasks[key]
        if paths == [key]:
            values = {key: (layers_of(key, read_one), dtype)}
        elif fmt := _block_format(leaves[paths[0]]):  # a BlockWeight: its blocks, reshaped
            parts = layers_of(key, lambda path: read_blocks(path, fmt))
            values = {}
            for name, part in zip(("qs", "d", "m"), parts, strict=True):
                if part is not None:
                    shape = leaves[(*key, name)].get_value().shape
                    values[(*key, name)] = (part.reshape(shape), part.dtype)
        else:  # an Int8Weight: quantize the float tensor once for "q" and "scale"
            contract = leaves[paths[0]].contract
            q, scale = quantize_int8(np.asarray(layers_of(key, read_one), np.float32), contract)
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


def _block_format(var) -> str | None:
    return getattr(var, "block_format", None)


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
