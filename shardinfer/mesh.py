"""Building named device meshes from specs like "data=2,model=4"."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

if TYPE_CHECKING:
    from shardinfer.sharding import ShardingRules

MeshSpec = str | Mapping[str, int] | None

# The two axes the default sharding rules use. Other names need rules that map onto them.
DATA, MODEL = "data", "model"


def parse_mesh_spec(spec: MeshSpec) -> dict[str, int]:
    """ "data=2,model=4" or {"data": 2, "model": 4} -> an ordered dict of axis sizes."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"mesh axis {part!r} must look like name=size, e.g. 'data=2'")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                msg = f"mesh axis {name.strip()!r} has a non-integer size {size!r}"
                raise ValueError(msg) from None
    else:
        raise ValueError(f"a mesh spec is a string like 'data=2,model=4' or a dict, got {spec!r}")
    axes: dict[str, int] = {}
    for name, size in items:
        if not name.isidentifier():
            raise ValueError(f"mesh axis name {name!r} is not a valid name")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} appears twice")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size}; sizes are >= 1, or -1 to fill")
        axes[name] = size
    return axes


def check_mesh_axes(spec: MeshSpec, rules: ShardingRules | None = None) -> dict[str, int]:
    """`parse_mesh_spec(spec)`, refusing any axis name the sharding rules never map onto.

    Nothing would be sharded over such an axis (everything on it replicated), so a name like
    "date" or "foo" is a typo, not a choice. Custom axis names need custom `rules`. Needs no
    devices, so the command line checks its --mesh with it before loading anything.
    """
    from shardinfer.sharding import ShardingRules  # sharding.py may come to import this module

    axes = parse_mesh_spec(spec)
    used = (rules if rules is not None else ShardingRules.load()).mesh_axes()
    unknown = [name for name in axes if name not in used]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        what = f"mesh axis {names} is" if len(unknown) == 1 else f"mesh axes {names} are"
        known = ", ".join(repr(name) for name in used) or "none"
        raise ValueError(
            f"{what} not used by the sharding rules, so nothing would be sharded over "
            f"{'it' if len(unknown) == 1 else 'them'}; the rules use the mesh axes {known}"
        )
    if not axes and DATA not in used:
        known = ", ".join(repr(name) for name in used) or "none"
        raise ValueError(
            f"the default mesh puts every device on {DATA!r}, which these sharding rules do not "
            f"use; give a mesh spec over the axes they use: {known}"
        )
    return axes


def make_mesh(
    spec: MeshSpec = None,
    devices: Sequence[jax.Device] | None = None,
    rules: ShardingRules | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all devices, all on `data`), in topology order.

    One axis may be -1: it takes whatever the others leave. Every axis must be one the sharding
    `rules` (default: `ShardingRules.load()`) map some logical axis onto. Axis types are Auto:
    shardings propagate from the parameters and a few constraints at block edges (see
    sharding.py).
    """
    axes = check_mesh_axes(spec, rules)
    all_devices = list(devices) if devices is not None else jax.devices()
    n = len(all_devices)
    if n == 0:
        raise ValueError("make_mesh got an empty device list")
    axes = axes or {DATA: n}
    fill = [name for name, size in axes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(fill)}")
    known = math.prod(size for size in axes.values() if size != -1)
    if fill:
        if n % known:
            raise ValueError(f"cannot fill axis {fill[0]!r}: {n} devices do not divide by {known}")
        axes[fill[0]] = n // known
    if math.prod(axes.values()) != n:
        shape = ", ".join(f"{k}={v}" for k, v in axes.items())
        raise ValueError(
            f"mesh axes ({shape}) multiply to {math.prod(axes.values())}, but there are {n} devices"
        )
    shape, names = tuple(axes.values()), tuple(axes.keys())
    auto = (AxisType.Auto,) * len(names)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=auto)
    # An explicit subset: still order it by topology where the platform knows how.
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=all_devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(all_devices, dtype=object).reshape(shape)
    return Mesh(grid, names, axis_types=auto)


def mesh_platform(mesh: Mesh) -> str:
    """What the mesh's devices are: "cpu", "gpu" or "tpu" (one kind per mesh)."""
    return mesh.devices.flat[0].platform


def describe_mesh(mesh: Mesh) -> str:
    axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"Mesh({axes}) over {mesh.devices.size} {mesh_platform(mesh)} device(s)"


def split_devices(replicas: int, devices: Sequence[jax.Device] | None = None) -> list[list]:
    """`devices` (default: all) cut into `replicas` equal contiguous groups."""
    devices = list(devices if devices is not None else jax.devices())
    if replicas < 1 or len(devices) % replicas:
        raise ValueError(
            f"replicas={replicas} must be >= 1 and divide the {len(devices)} devices evenly"
        )
    size = len(devices) // replicas
    return [devices[i * size : (i + 1) * size] for i in range(replicas)]
