"""Logical axis names -> mesh PartitionSpecs, through one rules table (configs/sharding.yaml).

Model code names logical axes only ("batch", "embed", "q_heads", ...). This module is the one
place that turns them into physical mesh axes, and the one place that decides what happens when
a dimension does not divide by its mesh axis: it falls back to replicated and says so once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardinfer.config import load_preset

log = logging.getLogger("shardinfer")

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """An ordered, hashable logical->mesh axis table."""

    rules: tuple[tuple[str, str | None], ...]

    @classmethod
    def load(cls, preset: str = "default") -> ShardingRules:
        table = load_preset("sharding")
        if preset not in table:
            raise ValueError(f"no sharding preset {preset!r}; known: {', '.join(table)}")
        return cls(tuple((k, v) for k, v in table[preset].items()))

    def replace(self, **changes: str | None) -> ShardingRules:
        """These rules with some logical axes mapped elsewhere: `rules.replace(mlp=None)`
        replicates the MLP weights, `rules.replace(vocab="data")` moves the vocabulary."""
        unknown = sorted(set(changes) - {name for name, _ in self.rules})
        if unknown:
            raise ValueError(f"no rule for logical axis {unknown}; rules cover {self.names()}")
        return ShardingRules(tuple((name, changes.get(name, axis)) for name, axis in self.rules))

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        for name, axis in self.rules:
            if name == logical:
                return axis
        raise ValueError(f"logical axis {logical!r} has no rule; rules cover {self.names()}")

    def names(self) -> str:
        return ", ".join(name for name, _ in self.rules)

    def mesh_axes(self) -> tuple[str, ...]:
        """The mesh axes some logical axis maps onto, in table order, each once."""
        return tuple(dict.fromkeys(axis for _, axis in self.rules if axis is not None))


_already_logged: set[tuple] = set()


def logical_to_spec(
    logical_axes: LogicalAxes,
    shape: Sequence[int],
    mesh: Mesh,
    rules: ShardingRules,
    what: str = "array",
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry `logical_axes`.

    A mesh axis missing from the mesh, or of size 1, means replicated. A dimension that does not
    divide by its mesh axis is replicated instead, with one log line per distinct case.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{what}: {len(logical_axes)} logical axes for shape {tuple(shape)}")
    spec: list[str | None] = []
    used: dict[str, str] = {}
    for logical, dim in zip(logical_axes, shape, strict=True):
        axis = rules.mesh_axis(logical)
        if axis is None or mesh.shape.get(axis, 1) == 1:
            spec.append(None)
            continue
        if axis in used:
            raise ValueError(
                f"{what}: logical axes {used[axis]!r} and {logical!r} both map to mesh axis "
                f"{axis!r}; one array cannot be split twice over one mesh axis"
            )
        size = mesh.shape[axis]
        if dim % size:
            key = (logical, dim, axis, size)
            # Remembered only once said: a script that turns logging on after its first load
            # still hears it.
            if key not in _already_logged and log.isEnabledFor(logging.INFO):
                _already_logged.add(key)
                log.info(
                    "%s of size %d does not divide by mesh axis %s=%d: replicated instead",
                    logical,
                    dim,
                    axis,
                    size,
                )
            spec.append(None)
            continue
        used[axis] = logical
        spec.append(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Sharder:
    """A mesh plus its rules: what model code holds to place arrays by logical names."""

    mesh: Mesh
    rules: ShardingRules

    def spec(self, logical_axes: LogicalAxes, shape: Sequence[int], what: str = "array"):
        return logical_to_spec(logical_axes, shape, self.mesh, self.rules, what)

    def sharding(self, logical_axes: LogicalAxes, shape: Sequence[int], what: str = "array"):
        return NamedSharding(self.mesh, self.spec(logical_axes, shape, what))

    def constrain(self, x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
        """Pins an activation's layout inside jit (used at block edges only)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def replicate(self, x: jax.Array) -> jax.Array:
        """Every device gets the whole value (inside jit): what the host reads back, so that
        every process holds it (a data-sharded output would span other processes' devices)."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec()))

    def axis_size(self, logical: str) -> int:
        axis = self.rules.mesh_axis(logical)
        return 1 if axis is None else self.mesh.shape.get(axis, 1)


def place(sharder: Sharder, array: np.ndarray, logical_axes: LogicalAxes) -> jax.Array:
    """A host array (the same on every process) onto the mesh, each device taking its slice.

    The one way inputs reach the devices. Each slice is copied: on CPU a device array may
    share the numpy buffer, and the scheduler changes its arrays in place while a step that
    read them can still be running."""
    array = np.asarray(array)
    sharding = sharder.sharding(logical_axes, array.shape)
    return jax.make_array_from_callback(
        array.shape, sharding, lambda index: np.array(array[index], copy=True)
    )


def fetch_replicated(x: jax.Array) -> np.ndarray:
    """A replicated device array as numpy, read from this process's first device."""
    return np.asarray(x.addressable_data(0))
