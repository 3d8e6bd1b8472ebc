"""shardinfer's own checkpoints: sharded Orbax arrays plus the config and the tokenizer.

A checkpoint saved from one mesh restores straight into another mesh's shardings: each process
reads only the slices its devices hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from shardinfer.weights.tokenizer import Tokenizer

MARKER = "shardinfer.json"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def save_checkpoint(
    path: Path,
    config: Any,  # a family's config: `to_dict()` is stored
    state: nnx.State,
    dtype,
    tokenizer: Tokenizer | None,
    quantize: str | None,
    block_formats: dict[str, str] | None = None,
) -> None:
    """`block_formats`: each block weight's format by name, for quantize="gguf" (whose
    weights keep the formats their file had; model.py `block_formats`)."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not empty; choose a new directory")
    # Every process checked the directory before any writes to it (each writes its shards).
    _sync("shardinfer-save-checked")
    path.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp  # here, not at the top: it adds ~0.3 s to every start

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
    _sync("shardinfer-save-written")
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save(path)
    if jax.process_index() == 0:
        # Written last: a directory without it is an unfinished save, never mistaken for one.
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": str(dtype),
            "quantize": quantize,
            "config": config.to_dict(),
        }
        if block_formats:
            meta["block_formats"] = block_formats
        (path / MARKER).write_text(json.dumps(meta, indent=1))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_checkpoint_config(
    path: Path, families: Callable[[str | None], Any]
) -> tuple[Any, str | None]:
    """The model config (read back by the `from_dict` of the family that `families(architecture)`
    returns: models/registry.py `family_for`), and the quantization the arrays are stored in."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MARKER} is corrupted ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is unknown")
    config = meta["config"]
    return families(config.get("architecture")).config_type.from_dict(config), meta.get("quantize")


def read_block_formats(path: Path) -> dict[str, str]:
    """The block formats a quantize="gguf" checkpoint lists (see `save_checkpoint`)."""
    formats = json.loads((path / MARKER).read_text()).get("block_formats")
    if not isinstance(formats, dict) or not formats:
        raise ValueError(f"{path} stores quantize='gguf' weights but lists no block formats")
    return formats


def restore_params(path: Path, abstract: nnx.State, shardings: nnx.State) -> nnx.State:
    """Restores into `abstract`'s structure, dtypes and `shardings` (any mesh)."""
    target = jax.tree.map(
        lambda var, sharding: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding),
        nnx.to_pure_dict(abstract),
        nnx.to_pure_dict(shardings),
    )
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", target)
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
        raise ValueError(f"{path}: cannot restore the checkpoint's arrays ({e})") from e
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, restored)
    return state
